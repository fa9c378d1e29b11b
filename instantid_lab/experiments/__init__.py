"""Experiments on InstantID: the questions users of the method ask, answered with numbers.

- `metrics`   identity (an evaluator that did not condition), face detection, keypoint error, prompt
              adherence; tidy pandas tables
- `multireference` the paper's Fig. 4: identity vs the number of reference photos N, per combiner (mean,
              norm_mean, weighted, concat), paired over identities x noise seeds
- `applications` the paper's Figs. 10-12: identity interpolation (lerp / slerp), novel views from moved
              keypoints, several identities in one image (regional identity attention and IdentityNet)

Experiments sit above the pipeline and the miniature (they score with the miniature's evaluator and
inspector) and below the notebooks: nothing in the core or the miniature imports them.
"""
