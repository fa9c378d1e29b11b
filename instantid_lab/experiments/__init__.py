"""Experiments on InstantID: the questions users of the method ask, answered with numbers.

- `metrics`   identity (an evaluator that did not condition), face detection, keypoint error, prompt
              adherence; tidy pandas tables
- `cells`     one cell of an ablation grid in the miniature: its inputs (reference embedding, target
              keypoints and caption, noise), one batched generation call for many cells, their scores
- `grid`      the paper's Figs. 3 and 9 as numbers: a `Grid` over the pipeline's arguments with presets
              (scales, parts, prompt, windows, negative), run batched and cached per cell; CLI
              `python -m instantid_lab.experiments.grid --preset scales --out DIR`
- `pose`      pose freedom: identity vs keypoint error when a pose the reference lacks is asked for,
              across IdentityNet scale, control window and no keypoints (runs through `grid`)
- `plots`     heatmaps, trade-off curves, image sheets of grid runs (matplotlib)
- `multireference` the paper's Fig. 4: identity vs the number of reference photos N, per combiner (mean,
              norm_mean, weighted, concat), paired over identities x noise seeds
- `applications` the paper's Figs. 10-12: identity interpolation (lerp / slerp), novel views from moved
              keypoints, several identities in one image (regional identity attention and IdentityNet)

Experiments sit above the pipeline and the miniature (they score with the miniature's evaluator and
inspector) and below the notebooks: nothing in the core or the miniature imports them.
"""
