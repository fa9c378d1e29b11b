"""The miniature: InstantID trained small enough to run and retrain on a CPU.

Layered bottom-up; a module imports only from the layers below it (a test reads the imports):

1. the world     `world`        procedural cartoon faces: identity, pose, caption, 5 keypoints
2. the models    `recognizer`   toy ArcFace face recognisers (one conditions generation, another evaluates)
   (each with    `inspector`    a small CNN that reads a face's 5 keypoints and caption attributes
   its loader                   (evaluation only)
   and saver)    `autoencoder`  the tiny latent autoencoder (32x32x3 <-> 16x16x8)
                 `base`         the caption-conditioned base model (trained, then frozen); `load_base`
                                returns it as an `InstantIDPipeline` without adapter and IdentityNet
                 `instantid`    InstantID on the frozen base with the kit's own Resampler, attention
                                and IdentityNet; `load_miniature("data/miniature")` -> `InstantIDPipeline`
                 `objective`    the one training objective (v-prediction, min-SNR) on the pipeline's
                                own denoising stage
3. the scorers   `evaluate`     held-out identity / keypoint / caption scores (`HeldoutTask`, `Judges`);
                                CLI `python -m instantid_lab.miniature.evaluate`
                 `analyzer`     `get_face_analyzer("miniature")`: the kit's `FaceAnalyzer` interface
4. training      `training/`    one loop, the rendered data, one module per stage
5. the top       `train`        the CLI: `python -m instantid_lab.miniature.train STAGE --preset quick|full`
                 `curves`, `demo`  training-curve plots and sweep helpers for the notebooks

Shipped weights and how they were trained: `data/miniature/MODEL_CARD.md`.
"""
