"""The one training loop every miniature stage runs: recognisers, inspector, autoencoder, base, InstantID.

`train_loop` minimises `loss_fn(generator, shard)` over a model's trainable parameters with AdamW,
through `accelerate.Accelerator` (device placement, mixed precision, and the processes of
`accelerate launch --num_processes N`), optionally keeping an exponential moving average of the
weights (diffusers' `EMAModel`).

Several processes (data parallel): each draws the same global batch with the same generator and
scores its `objective.Shard` of it; after the backward pass the gradients are averaged across the
processes (`accelerator.reduce`), so every process takes the same step as one process on the whole
batch would (stages with BatchNorm, the recognisers and the inspector, normalise over each shard:
close, not equal). The main process alone scores, checkpoints and writes. Two learning-rate schedules:

- "cosine" (the generative stages): lr * (step + 1) / warmup during warmup, then a cosine from lr
  down to lr * final_lr_fraction (`learning_rate`);
- "one_cycle" (the recognisers and the inspector): torch's `OneCycleLR` (10% warm-up).

With `out`, it writes a checkpoint (weights, optimizer, schedule, EMA, step, losses, scores and the
batch generator's state) every `checkpoint_every` steps, atomically, so re-running the same command
after an interruption continues with exactly the batches an uninterrupted run would have drawn.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ...errors import CheckpointError
from ..objective import Shard

#: loss_fn(generator, shard) -> scalar loss: draws the global batch with `generator`, scores `shard.take(...)` of it.
LossFn = Callable[[torch.Generator, Shard], torch.Tensor]


def process_state():
    """accelerate's view of the processes (one, or those `accelerate launch` / `torchrun` started).

    On a machine without a GPU the processes are CPU processes talking through gloo: launch them with
    `torchrun --nproc_per_node N -m instantid_lab.miniature.train ...` (accelerate's own CPU launcher
    needs MPI); on GPUs, `accelerate launch --multi_gpu --num_processes N -m ...`.
    """
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def is_main_process() -> bool:
    """Whether this is the process that writes (the only one without a launcher)."""
    return process_state().is_main_process


def training_device() -> torch.device:
    """The device this process trains on (a GPU when there is one, else the CPU)."""
    return process_state().device


@dataclass(frozen=True)
class LoopSettings:
    """How `train_loop` optimises.

    :param schedule: "cosine" (warmup, then cosine to `final_lr_fraction`) or "one_cycle" (OneCycleLR).
    :param clip_grad_norm: clip the gradients' global norm to this (None: no clipping).
    :param ema_decay: keep an EMA of the weights with this decay (None: no EMA); a finished run leaves the
        EMA weights in the model (what the stages save).
    :param mixed_precision: the `Accelerator`'s setting: "no", "fp16" or "bf16".
    """

    steps: int
    lr: float
    warmup: int = 0
    weight_decay: float = 1e-2
    ema_decay: Optional[float] = None
    checkpoint_every: int = 200
    final_lr_fraction: float = 0.1
    schedule: str = "cosine"
    clip_grad_norm: Optional[float] = 1.0
    mixed_precision: str = "no"


@dataclass
class LoopState:
    """Where a run stands; what `train_loop` returns and what its checkpoint holds.

    :param ema: the weights' moving average (diffusers `EMAModel`), or None.
    :param evals: what `on_checkpoint` returned, each with its "step".
    """

    step: int = 0
    losses: list = field(default_factory=list)
    seconds: float = 0.0
    evals: list = field(default_factory=list)
    ema: Optional[object] = None
    finished: bool = False


def learning_rate(step: int, s: LoopSettings) -> float:
    """lr(step) = lr * step / warmup during warmup, then a cosine from lr down to lr * final_lr_fraction."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (s.final_lr_fraction + (1 - s.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


def checkpoint_path(out: Path, name: str) -> Path:
    return Path(out) / f"{name}_checkpoint.pt"


def checkpoint_step(out: Path, name: str) -> Optional[int]:
    """The step of the checkpoint `name` in `out` (what a re-run would continue from), or None if there is none."""
    path = checkpoint_path(out, name)
    return int(read_checkpoint(path)["step"]) if path.exists() else None


def read_checkpoint(path: Path) -> dict:
    """A training checkpoint, read safely (`weights_only`: tensors and plain values, never code).

    :raises CheckpointError: the file is not a readable checkpoint of this loop (names it; nothing is touched).
    """
    try:
        payload = torch.load(path, weights_only=True)
    except Exception as error:  # truncated, not a torch file, or holding objects weights_only refuses
        raise CheckpointError(f"cannot resume from {path}: it is not a readable training checkpoint "
                              f"({type(error).__name__}). Move or delete it to start this stage afresh, "
                              "or point --out at another folder; nothing in the folder was changed.") from error
    missing = sorted({"model", "optimizer", "step", "losses", "generator"} - set(payload if isinstance(payload, dict) else ()))
    if missing:
        raise CheckpointError(f"cannot resume from {path}: it lacks {missing} (not a checkpoint of this training "
                              "loop). Move or delete it, or point --out at another folder; nothing was changed.")
    return payload


def train_loop(name: str, model: nn.Module, loss_fn: LossFn, s: LoopSettings, out: Optional[Path] = None,
               seed: int = 0, stop_after: Optional[int] = None, progress: bool = True,
               on_checkpoint: Optional[Callable[[int], dict]] = None) -> LoopState:
    """Minimise `loss_fn` over `model`'s trainable parameters; resume from `out` if a checkpoint exists.

    :param loss_fn: `loss_fn(generator, shard)`: draws the global batch with the generator (whose state is
        checkpointed, so a resumed run sees the batches an uninterrupted one would) and returns the loss
        of this process's `shard` of it (`objective.Shard`: its part, on its device).
    :param out: folder for the checkpoint (None: no checkpoint, no resume).
    :param stop_after: stop (after checkpointing) once this many steps are done, as an interruption would.
    :param on_checkpoint: called with the step number at step 0 and at every checkpoint (model in eval
        mode, holding the EMA weights if `s.ema_decay` is set: what would ship); what it returns is kept,
        with the step, in `evals` (and in the checkpoint).
    """
    from accelerate import Accelerator

    process_state()  # the processes' state first, with the CPU flag every later query uses
    accelerator = Accelerator(mixed_precision=s.mixed_precision, cpu=not torch.cuda.is_available())
    params = [p for p in model.to(accelerator.device).parameters() if p.requires_grad]
    optimizer = accelerator.prepare(torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay))
    run = _Run(name, model, optimizer, s, accelerator, out, seed, on_checkpoint)
    end = s.steps if stop_after is None else min(s.steps, stop_after)
    run.evaluate_at_start()
    model.train()
    for step in tqdm(range(run.state.step, end), desc=name, initial=run.state.step, total=s.steps, disable=not progress):
        run.step(loss_fn, step)
        if run.state.step % s.checkpoint_every == 0 or run.state.step == end:
            run.checkpoint()
    model.eval()
    run.state.finished = run.state.step >= s.steps
    if run.state.finished and run.state.ema is not None:
        run.state.ema.copy_to(run.params)  # a finished run's model holds the EMA weights: what ships
    return run.state


class _Run:
    """One call of `train_loop`: the optimiser, schedule, EMA and generator, and their checkpoint."""

    def __init__(self, name, model, optimizer, s: LoopSettings, accelerator, out, seed, on_checkpoint):
        self.model, self.optimizer, self.s, self.accelerator = model, optimizer, s, accelerator
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.path = None if out is None else checkpoint_path(out, name)
        self.on_checkpoint, self.generator = on_checkpoint, torch.Generator().manual_seed(seed)
        self.schedule = _one_cycle(optimizer, s) if s.schedule == "one_cycle" else None
        self.shard = Shard(accelerator.process_index, accelerator.num_processes, accelerator.device)
        self.state = LoopState(ema=_ema(self.params, s))
        if self.path is not None and self.path.exists():
            self._resume()
        self.started = time.perf_counter()

    def step(self, loss_fn: LossFn, step: int) -> None:
        """One optimiser step (lr set by the schedule), the EMA update, the loss recorded."""
        if self.schedule is None:
            for group in self.optimizer.param_groups:
                group["lr"] = learning_rate(step, self.s)
        loss = loss_fn(self.generator, self.shard)
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        self._average_over_processes()
        if self.s.clip_grad_norm is not None:
            self.accelerator.clip_grad_norm_(self.params, self.s.clip_grad_norm)
        self.optimizer.step()
        if self.schedule is not None:
            self.schedule.step()
        if self.state.ema is not None:
            self.state.ema.step(self.params)
        self.state.losses.append(self._mean_over_processes(loss.detach()).item())
        self.state.step = step + 1

    def _average_over_processes(self) -> None:
        """Data parallel: every gradient becomes its mean over the processes (nothing to do for one)."""
        if self.shard.count > 1:
            for p in self.params:
                if p.grad is not None:
                    p.grad = self.accelerator.reduce(p.grad, reduction="mean")

    def _mean_over_processes(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.shard.count == 1 else self.accelerator.reduce(x, reduction="mean")

    def evaluate_at_start(self) -> None:
        if self.on_checkpoint is not None and self.state.step == 0 and is_main_process():
            self.state.evals.append({"step": 0, **self._evaluate(0)})

    def checkpoint(self) -> None:
        """Add the elapsed time, score (`on_checkpoint`) and save; the scoring time is not counted."""
        self.state.seconds += time.perf_counter() - self.started
        if self.on_checkpoint is not None and is_main_process():
            self.state.evals.append({"step": self.state.step, **self._evaluate(self.state.step)})
        self.started = time.perf_counter()
        if self.path is not None and is_main_process():
            self._save()
        self.accelerator.wait_for_everyone()

    def _evaluate(self, step: int) -> dict:
        """`on_checkpoint(step)` on the weights that would ship: the EMA's, if there is one."""
        ema = self.state.ema
        self.model.eval()
        if ema is not None:
            ema.store(self.params)
            ema.copy_to(self.params)
        try:
            return self.on_checkpoint(step)
        finally:
            if ema is not None:
                ema.restore(self.params)
            self.model.train()

    def _save(self) -> None:
        """Write atomically (temporary file, then rename), so an interruption never leaves half a checkpoint."""
        st = self.state
        payload = {"model": self.accelerator.unwrap_model(self.model).state_dict(),
                   "optimizer": self.optimizer.state_dict(), "step": st.step, "losses": st.losses,
                   "seconds": st.seconds, "evals": json.dumps(st.evals), "generator": self.generator.get_state(),
                   "schedule": None if self.schedule is None else self.schedule.state_dict(),
                   "ema": None if st.ema is None else st.ema.state_dict()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, self.path)

    def _resume(self) -> None:
        payload = read_checkpoint(self.path)
        try:
            self.accelerator.unwrap_model(self.model).load_state_dict(payload["model"])
        except RuntimeError as error:  # other shapes or names: a run of another configuration or base
            raise CheckpointError(f"cannot resume from {self.path}: its weights do not fit this model (a run with "
                                  "another configuration, or on another base). Move or delete it to start this "
                                  "stage afresh, or point --out at another folder; nothing was changed.") from error
        self.optimizer.load_state_dict(payload["optimizer"])
        self.generator.set_state(payload["generator"])
        if self.schedule is not None:
            self.schedule.load_state_dict(payload["schedule"])
        if self.state.ema is not None and payload.get("ema") is not None:
            self.state.ema.load_state_dict(payload["ema"])
        elif self.state.ema is not None:  # a checkpoint written without an EMA: the average starts here
            self.state.ema = _ema(self.params, self.s)
        self.state.step, self.state.losses = payload["step"], list(payload["losses"])
        self.state.seconds, self.state.evals = payload["seconds"], json.loads(payload["evals"])


def _one_cycle(optimizer, s: LoopSettings):
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=s.lr, total_steps=s.steps, pct_start=0.1)


def _ema(params: list, s: LoopSettings):
    """diffusers' `EMAModel`: decay min(ema_decay, (1 + k) / (10 + k)) at update k (a fast start)."""
    if s.ema_decay is None:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(params, decay=s.ema_decay)
