"""The miniature: InstantID trained small enough to run and retrain on a CPU.

`world` renders the procedural cartoon faces (identity, pose, caption) the miniature learns from.
"""
