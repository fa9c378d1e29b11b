"""The miniature: InstantID trained small enough to run and retrain on a CPU.

- `world`        procedural cartoon faces: identity, pose, caption, 5 keypoints
- `recognizer`   toy ArcFace face recognisers (one conditions generation, another evaluates)
- `autoencoder`  the tiny latent autoencoder (32x32x3 <-> 16x16x4)
- `base`         the caption-conditioned latent diffusion base model (trained, then frozen)
- `instantid`    InstantID on top of the frozen base with the kit's own adapter, attention and
                 IdentityNet; `load_miniature("data/miniature")` returns an `InstantIDPipeline`
- `inspector`    a small CNN that reads a face's 5 keypoints and caption attributes (evaluation only)
- `analyzer`     `get_face_analyzer("miniature")`: keypoints from the inspector, embedding from the
                 conditioning recogniser, behind the kit's `FaceAnalyzer` interface
- `evaluate`     held-out identity / keypoint / caption scores for base, adapter only, IdentityNet
                 only and both: `python -m instantid_lab.miniature.evaluate`
- `train`        one CLI stage per part: `python -m instantid_lab.miniature.train STAGE --preset quick|full`
- `curves`, `demo`  training-curve plots and sweep helpers for the notebooks

Shipped weights and how they were trained: `data/miniature/MODEL_CARD.md`.
"""
