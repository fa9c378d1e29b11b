"""The miniature: InstantID trained small enough to run and retrain on a CPU.

- `world`        procedural cartoon faces: identity, pose, caption, 5 keypoints
- `recognizer`   toy ArcFace face recognisers (one conditions generation, another evaluates)
- `autoencoder`  the tiny latent autoencoder (32x32x3 <-> 16x16x4)
- `base`         the caption-conditioned latent diffusion base model (trained, then frozen)
- `instantid`    InstantID on top of the frozen base with the kit's own adapter, attention and
                 IdentityNet; `load_miniature("data/miniature")` returns an `InstantIDPipeline`
- `train`        one CLI stage per part: `python -m instantid_lab.miniature.train STAGE --preset quick|full`

Shipped weights and how they were trained: `data/miniature/MODEL_CARD.md`.
"""
