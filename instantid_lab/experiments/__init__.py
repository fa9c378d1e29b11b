"""Experiments on InstantID: the questions users of the method ask, answered with numbers.

- `metrics`   identity (an evaluator that did not condition), face detection, keypoint error, prompt
              adherence; tidy pandas tables

Experiments sit above the pipeline and the miniature (they score with the miniature's evaluator and
inspector) and below the notebooks: nothing in the core or the miniature imports them.
"""
