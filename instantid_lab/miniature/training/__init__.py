"""Training the miniature: one loop, the rendered data, one module per stage.

- `loop`         `train_loop`, the one loop every stage runs (AdamW, cosine or one-cycle schedule,
                 `accelerate.Accelerator`, diffusers' `EMAModel`, atomic checkpoints, resume)
- `data`         the renders every stage trains on (`TrainingBatch`es, cached in the output folder)
- `report`       the JSON report a stage writes beside its weights
- `recognizers`, `inspector`, `autoencoder`, `base`, `instantid`   the stages, in training order

The command line is `python -m instantid_lab.miniature.train STAGE` (`miniature/train.py`).
"""

from .autoencoder import train_autoencoder
from .base import train_base
from .inspector import train_inspector_stage
from .instantid import train_instantid
from .loop import LoopSettings, LoopState, checkpoint_path, checkpoint_step, train_loop
from .recognizers import RecognizerPreset, train_recognizers

__all__ = ["LoopSettings", "LoopState", "RecognizerPreset", "checkpoint_path", "checkpoint_step", "train_autoencoder", "train_base",
           "train_inspector_stage", "train_instantid", "train_loop", "train_recognizers"]
