"""The one training loop for every model.

Models supply a loss; the loop supplies the rest: device placement, seeded and
resumable batch order, optimizer and learning-rate schedule from the card,
gradient clipping, a NaN/Inf guard, atomic checkpoints every N steps and at the
end, ``--resume`` from the last checkpoint, a progress bar with loss and ETA, and
a JSON-lines metrics log.

A resumed run continues with the optimizer state, the position in the epoch and
every random-number state of the interrupted one, so it finishes with the same
parameters as an uninterrupted run with the same seed (bit for bit on CPU).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from .cards import TrainingSection
from .io.store import atomic_target

__all__ = ["TrainingError", "TrainResult", "train", "lr_factor", "make_optimizer", "seed_everything", "load_checkpoint",
           "plan_to_time_limit"]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
#: a time-limited training (``training.time_limit_s``) leaves out its first steps (device
#: warm-up, first allocations) and times the next ones before fitting its length to the budget
PLAN_WARMUP_STEPS = 5
PLAN_TIMED_STEPS = 40
#: the share of the budget a plan fills; the rest absorbs the estimate's error and the
#: checkpoints (a training that still reaches the limit stops there: ``stopped_by_limit``)
PLAN_FILL = 0.95

LossOutput = torch.Tensor | dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Sequence[torch.Tensor]], LossOutput]


class TrainingError(RuntimeError):
    """Training cannot go on (repeated non-finite losses, a checkpoint that does not fit)."""


@dataclass
class TrainResult:
    """Outcome of :func:`train`.

    Fields: ``steps`` optimizer steps taken in total, ``epochs`` completed epochs,
    ``final_loss`` mean training loss of the last logging interval,
    ``val_loss`` last validation loss (None without validation data),
    ``skipped_steps`` steps dropped by the NaN/Inf guard, ``train_s`` wall time of
    this call, ``resumed_from`` step the run was resumed at (None for a fresh run),
    ``best_epoch`` and ``best_val_loss`` the epoch with the lowest validation loss and
    that loss (with ``training.keep_best`` the model ends with that epoch's parameters),
    ``time_plan`` how a time-limited training fitted its length (:func:`plan_to_time_limit`).
    """

    steps: int
    epochs: int
    final_loss: float
    val_loss: float | None
    skipped_steps: int
    train_s: float
    resumed_from: int | None = None
    history: list[dict] = field(default_factory=list)
    best_epoch: int | None = None
    best_val_loss: float | None = None
    time_plan: dict | None = None

    def summary(self, kept_best: bool = False) -> dict:
        """The figures a report states about the training."""
        out = {"steps": self.steps, "epochs": self.epochs, "final_loss": self.final_loss,
               "val_loss": self.val_loss, "best_epoch": self.best_epoch, "best_val_loss": self.best_val_loss,
               "skipped_steps": self.skipped_steps}
        if self.resumed_from is not None:
            out["resumed_from"] = self.resumed_from
        if kept_best:
            out["model_from_epoch"] = self.best_epoch
        if self.time_plan is not None:
            out["time_limit"] = self.time_plan
        return out


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(params, cfg: TrainingSection) -> torch.optim.Optimizer:
    o = cfg.optimizer
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    raise TrainingError(f"unknown optimizer {o.name!r}")


def lr_factor(step: int, total: int, cfg: TrainingSection) -> float:
    """Learning-rate multiplier at a step: linear warm-up, then the card's schedule."""
    s = cfg.schedule
    if s.warmup_steps and step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    t = step - s.warmup_steps
    span = max(total - s.warmup_steps, 1)
    if s.name == "constant":
        return 1.0
    if s.name == "cosine":
        return s.min_lr_factor + (1 - s.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * min(t / span, 1.0)))
    if s.name == "step":
        return s.gamma ** (t // s.step_size)
    if s.name == "exponential":
        return max(s.gamma ** (t / s.step_size), s.min_lr_factor)
    if s.name == "onecycle":
        # rise to the peak over the first 30%, cosine down to min_lr_factor after
        rise = 0.3 * span
        if t < rise:
            return s.min_lr_factor + (1 - s.min_lr_factor) * t / rise
        return s.min_lr_factor + (1 - s.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * min((t - rise) / (span - rise), 1.0)))
    raise TrainingError(f"unknown schedule {s.name!r}")


def plan_to_time_limit(limit_s: float, elapsed_s: float, step: int, s_per_step: float, validation_s: float,
                       per_epoch: int, card_steps: int) -> int:
    """Steps in all of a training that must end ``limit_s`` seconds after its start.

    At ``step`` (``elapsed_s`` seconds in), a step takes ``s_per_step`` and one pass
    over the validation events, made once every ``per_epoch`` steps, ``validation_s``.
    The remaining steps fill :data:`PLAN_FILL` of what is left of the budget; the total
    lies between ``step`` and ``card_steps`` (the card's epochs or max_steps).

        >>> plan_to_time_limit(100.0, 10.0, 50, 0.1, 0.0, 1000, 10_000)
        900
        >>> plan_to_time_limit(100.0, 10.0, 50, 0.1, 0.0, 1000, 500)
        500
    """
    per_step = s_per_step + validation_s / max(per_epoch, 1)
    left = PLAN_FILL * limit_s - elapsed_s
    more = int(left / per_step) if left > 0 and per_step > 0 else 0
    return max(step, min(card_steps, step + more))


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_target(path, fsync=False) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same message
        raise TrainingError(f"checkpoint {path} cannot be read ({exc}); start a fresh run without --resume") from None


def _batch_order(n: int, batch_size: int, seed: int, epoch: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Event order for an epoch, a pure function of (seed, epoch): resumable.
    A permutation, or with ``weights`` n indices drawn with replacement in
    proportion to them."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if weights is None:
        return torch.randperm(n, generator=gen)
    # inverse-CDF draws (torch.multinomial stops at 2²⁴ events); right=True never
    # lands on a zero-weight event
    cdf = torch.cumsum(weights, 0)
    u = torch.rand(n, generator=gen, dtype=cdf.dtype) * cdf[-1]
    return torch.searchsorted(cdf, u, right=True).clamp(max=n - 1)


class _DeferredInterrupts:
    """Ctrl-C (SIGINT) and SIGTERM during training wait for the end of the current step
    (or epoch-end validation): the loop then writes a checkpoint of that consistent state
    and the signal takes its usual course (KeyboardInterrupt, or the command line's
    SIGTERM handler). A checkpoint written in the middle of a step would hold the step's
    random draws, and perhaps its update, without counting it, and the resumed run would
    differ from an uninterrupted one. A second signal acts at once (the last checkpoint
    is then the one kept). Outside the main thread, signals cannot be caught: nothing changes."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self):
        self.pending: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                signum = getattr(signal, name)
                if signal.getsignal(signum) in (signal.SIG_IGN, None):
                    continue  # ignored (a background job of a script): it stays ignored
                self._previous[signum] = signal.signal(signum, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.pending is not None:  # asked twice: stop now
            self._restore()
            self._deliver(signum, frame)
        self.pending = signum

    def _restore(self) -> None:
        import signal

        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def _deliver(self, signum, frame=None) -> None:
        import signal

        handler = signal.getsignal(signum)
        if callable(handler):
            handler(signum, frame)
        else:  # SIG_DFL: what the signal would have done
            signal.raise_signal(signum)
        raise KeyboardInterrupt  # a handler that returned: stop all the same

    def fire(self) -> None:
        """Deliver the pending signal (after the caller's checkpoint)."""
        signum, self.pending = self.pending, None
        self._restore()
        self._deliver(signum)

    def __exit__(self, *exc):
        self._restore()
        return False


def _as_loss(out: LossOutput) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    if isinstance(out, dict):
        if "loss" not in out:
            raise TrainingError("a loss function returning a dict must give its total under 'loss'")
        extras = {k: v.detach() for k, v in out.items() if k != "loss" and torch.is_tensor(v) and v.numel() == 1}
        return out["loss"], extras
    return out, {}


class _Metrics:
    """metrics.jsonl. A resumed run keeps the lines its checkpoint had seen (``lines``,
    counted by the checkpoint), so that lines written after the checkpoint and written
    again by the resumed run appear once; checkpoints from before that count keep the
    lines up to the checkpoint's step."""

    def __init__(self, path: Path, resume_step: int | None, lines: int | None = None):
        self.path = path
        self.count = 0
        if resume_step is not None and path.exists():
            kept = []
            for line in path.read_text().splitlines():
                if lines is not None and len(kept) >= lines:
                    break
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by the interruption
                if lines is not None or record.get("step", 0) <= resume_step:
                    kept.append(line)
            path.write_text("".join(k + "\n" for k in kept))
            self.count = len(kept)
        elif resume_step is None and path.exists():
            path.unlink()
        self.fh = open(path, "a")

    def write(self, record: dict) -> None:
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()
        self.count += 1

    def close(self):
        self.fh.close()


def train(
    model: nn.Module,
    loss_fn: LossFn,
    data: Sequence[torch.Tensor],
    cfg: TrainingSection,
    run_dir: str | Path,
    seed: int,
    device: torch.device | str = "cpu",
    val_data: Sequence[torch.Tensor] | None = None,
    resume: bool = False,
    progress: bool | None = None,
    description: str = "training",
    sample_weights: torch.Tensor | None = None,
) -> TrainResult:
    """Train ``model`` by minimising ``loss_fn(model, batch)`` over ``data``.

    Arguments:
        model: the network; moved to ``device``. A model with an ``optimizer_groups()``
            method (a list of ``{"params": ..., "lr_factor": f}``) gets those groups,
            each at f times the card's learning rate.
        loss_fn: returns a scalar loss, or a dict with ``"loss"`` and other scalars to log.
        data: tensors with the event index first (features, conditions, weights, ...).
        cfg: the card's training section.
        run_dir: where ``checkpoint.pt`` and ``metrics.jsonl`` live.
        seed: seeds the batch order and the model's random numbers.
        val_data: optional validation tensors, evaluated after every epoch.
        resume: continue from ``run_dir/checkpoint.pt`` when it exists.
        progress: show a progress bar (None: only on a terminal).
        sample_weights: optional non-negative weight per event: an epoch then draws its
            n events with replacement in proportion to them (oversampling rare classes);
            the loss itself is not weighted.

    Returns:
        a :class:`TrainResult`; the model holds the final parameters, or with
        ``cfg.keep_best`` those of the epoch with the lowest validation loss (early
        stopping without stopping: the schedule runs to its end, and the best state
        travels in the checkpoint, so an interrupted run keeps it).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    n = int(data[0].shape[0])
    if n == 0:
        raise TrainingError("no training events")
    if any(int(t.shape[0]) != n for t in data):
        raise TrainingError(f"training tensors disagree on the number of events: {[int(t.shape[0]) for t in data]}")
    if sample_weights is not None:
        sample_weights = torch.as_tensor(sample_weights, dtype=torch.float64).cpu()
        if sample_weights.shape != (n,) or not bool(torch.isfinite(sample_weights).all()) or bool((sample_weights < 0).any()) or float(sample_weights.sum()) <= 0:
            raise TrainingError(f"sample_weights must be {n} finite non-negative numbers with a positive sum")
    batch_size = min(cfg.batch_size, n)
    per_epoch = n // batch_size  # drop the ragged last batch: every step sees a full batch
    card_steps = cfg.max_steps or cfg.epochs * per_epoch
    total = card_steps
    model.to(device)
    data = [t.to(device) for t in data]
    val = [t.to(device) for t in val_data] if val_data is not None else None
    # A model may give its parameters in groups with their own learning-rate factor
    # (a GAN's discriminator and generator: two time-scale updates, arXiv:1706.08500).
    groups = model.optimizer_groups() if hasattr(model, "optimizer_groups") else model.parameters()
    optimizer = make_optimizer(groups, cfg)

    step, epoch, lr_scale, bad_in_row, skipped = 0, 0, 1.0, 0, 0
    resumed_from, resumed_loss, resumed_val_loss = None, float("nan"), None
    ckpt_path = run_dir / CHECKPOINT
    if cfg.keep_best and val_data is None:
        raise TrainingError("training.keep_best selects the epoch with the lowest validation loss, so it needs validation events (training.validation_fraction > 0)")
    best: dict | None = None  # {"epoch", "val_loss", "model"} of the lowest validation loss so far
    time_plan: dict | None = None  # how a time-limited run fitted its length (plan_to_time_limit)
    seed_everything(seed)
    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path, device)
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise TrainingError(f"checkpoint {ckpt_path} does not fit this model ({exc}); start a fresh run") from None
        step, epoch, lr_scale = state["step"], state["epoch"], state["lr_scale"]
        skipped = state.get("skipped", 0)
        best = state.get("best")
        # a time-limited run keeps the length (and so the schedule) it planned
        time_plan = state.get("time_plan")
        if time_plan is not None:
            total = state["total_steps"]
        # a run resumed at its end trains no step: its figures are the checkpoint's
        resumed_loss, resumed_val_loss = state.get("final_loss", float("nan")), state.get("val_loss")
        _set_rng_state(state["rng"])
        resumed_from = step
    metrics = _Metrics(run_dir / METRICS, resumed_from, state.get("metrics_lines") if resumed_from is not None else None)

    def checkpoint(finished: bool = False) -> None:
        _atomic_torch_save(
            {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "epoch": epoch,
                "lr_scale": lr_scale, "skipped": skipped, "rng": _rng_state(), "finished": finished,
                "total_steps": total, "seed": seed, "best": best, "final_loss": last_loss, "val_loss": val_loss,
                "time_plan": time_plan, "metrics_lines": metrics.count,
                # the losses of the log interval in progress, so that a resumed run logs what an uninterrupted one does
                "interval": {"losses": [v.detach().cpu() for v in interval_losses],
                             "extras": {k: torch.as_tensor(v).detach().cpu() for k, v in extras_sum.items()}},
            },
            ckpt_path,
        )

    from tqdm.auto import tqdm

    # on a terminal the bar redraws every second; in a batch job's log (no terminal) it
    # writes a line every 30 s, so the log shows the training's progress too
    terminal = os.isatty(2)
    bar = tqdm(total=total, initial=step, desc=description, unit="step", disable=progress is False, dynamic_ncols=True,
               mininterval=1.0 if terminal else 30.0)
    if resumed_from is not None and progress is not False:
        bar.write(f"{description}: resumed from {ckpt_path} at step {step} of {total} (epoch {epoch})")
    t0 = time.perf_counter()
    # kept as tensors and read once per logging interval: no device sync per step
    interval_losses: list[torch.Tensor] = []
    extras_sum: dict[str, torch.Tensor] = {}
    grad_norm_t = torch.tensor(float("nan"))
    history: list[dict] = []
    val_loss = resumed_val_loss
    last_loss = resumed_loss
    if resumed_from is not None:
        kept = state.get("interval") or {}
        interval_losses = [v.to(device) for v in kept.get("losses", [])]
        extras_sum = {k: v.to(device) for k, v in kept.get("extras", {}).items()}
    limit = cfg.time_limit_s
    # a time-limited run times steps plan_from .. plan_at, then fits its length to the budget
    plan_from = step + PLAN_WARMUP_STEPS if limit is not None and time_plan is None else None
    plan_at = plan_from + PLAN_TIMED_STEPS if plan_from is not None else None
    t_plan, t_validating = 0.0, 0.0  # t_validating: seconds in epoch-end validation passes

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    interrupts = _DeferredInterrupts()
    try:
        interrupts.__enter__()
        model.train()
        while step < total:
            order = _batch_order(n, batch_size, seed, epoch, sample_weights).to(device)  # one copy per epoch
            first_batch = step - epoch * per_epoch
            for b in range(first_batch, per_epoch):
                if step >= total:
                    break
                idx = order[b * batch_size : (b + 1) * batch_size]
                batch = [t[idx] for t in data]
                lr = cfg.optimizer.lr * lr_factor(step, total, cfg) * lr_scale
                for group in optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_factor", 1.0)
                optimizer.zero_grad(set_to_none=True)
                loss, extras = _as_loss(loss_fn(model, batch))
                # A non-finite loss gives non-finite gradients, so one check of loss and
                # gradient norm together (one device sync per step) guards both.
                loss.backward()
                if cfg.grad_clip is not None:
                    grad_norm_t = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                else:
                    grads = [p.grad.norm() for p in model.parameters() if p.grad is not None]
                    grad_norm_t = torch.stack(grads).norm() if grads else torch.zeros((), device=loss.device)
                finite = bool(torch.isfinite(loss.detach()).all() & torch.isfinite(grad_norm_t))
                if not finite:
                    # NaN/Inf guard: drop the step, lower the rate, give up if it persists.
                    optimizer.zero_grad(set_to_none=True)
                    bad_in_row += 1
                    skipped += 1
                    lr_scale *= cfg.nan_guard.lr_factor
                    metrics.write({"step": step, "epoch": epoch, "event": "non_finite_skipped", "lr_scale": lr_scale})
                    if bad_in_row >= cfg.nan_guard.max_bad_steps:
                        checkpoint()
                        raise TrainingError(
                            f"{bad_in_row} steps in a row gave a non-finite loss or gradient (step {step}, "
                            f"learning rate now {lr:.3g}); the last good state is in {ckpt_path}. Lower "
                            "training.optimizer.lr, tighten training.grad_clip or check the inputs for NaN/Inf."
                        )
                else:
                    optimizer.step()
                    bad_in_row = 0
                    interval_losses.append(loss.detach())
                    for k, v in extras.items():
                        extras_sum[k] = extras_sum.get(k, 0.0) + v
                step += 1
                bar.update(1)
                if step == plan_from:
                    sync()
                    t_plan, t_validating = time.perf_counter(), 0.0
                elif step == plan_at:
                    sync()
                    # the timed steps without the validation passes among them (counted apart below)
                    s_per_step = (time.perf_counter() - t_plan - t_validating) / PLAN_TIMED_STEPS
                    t_val = time.perf_counter()
                    if val is not None:
                        evaluate_loss(model, loss_fn, val, batch_size)
                        model.train()
                    validation_s = time.perf_counter() - t_val
                    total = plan_to_time_limit(limit, time.perf_counter() - t0, step, s_per_step, validation_s, per_epoch, card_steps)
                    time_plan = {"limit_s": limit, "card_steps": card_steps, "planned_steps": total, "s_per_step": s_per_step,
                                 "validation_s": validation_s, "stopped_by_limit": False}
                    metrics.write({"step": step, "epoch": epoch, "event": "time_plan", **time_plan})
                    bar.total = total
                    bar.refresh()
                if limit is not None and step < total and time.perf_counter() - t0 > limit:
                    # the budget is spent (the plan's estimate was short, or a resumed run):
                    # the run ends here, a finished run of `step` steps
                    total = step
                    if time_plan is not None:
                        time_plan["stopped_by_limit"] = True
                    else:
                        time_plan = {"limit_s": limit, "card_steps": card_steps, "planned_steps": None, "stopped_by_limit": True}
                    metrics.write({"step": step, "epoch": epoch, "event": "time_limit_reached", "limit_s": limit})
                if step % cfg.log_every == 0 or step == total:
                    if interval_losses:
                        last_loss = float(torch.stack(interval_losses).double().mean())
                    record = {"step": step, "epoch": epoch, "loss": last_loss, "lr": lr, "grad_norm": float(grad_norm_t),
                              "time_s": round(time.perf_counter() - t0, 3)}
                    record.update({k: float(v) / max(len(interval_losses), 1) for k, v in extras_sum.items()})
                    metrics.write(record)
                    history.append(record)
                    bar.set_postfix(loss=f"{last_loss:.4g}", lr=f"{lr:.2g}")
                    interval_losses, extras_sum = [], {}
                if step % cfg.checkpoint_every == 0 and step < total:
                    checkpoint()
                # (after the last step the run ends first: its epoch's validation and the
                # finished checkpoint, then the signal, after the loop)
                if interrupts.pending is not None and step < total:
                    checkpoint()
                    interrupts.fire()
            else:
                epoch += 1
                if val is not None:
                    t_val = time.perf_counter()
                    val_loss = evaluate_loss(model, loss_fn, val, batch_size)
                    t_validating += time.perf_counter() - t_val
                    metrics.write({"step": step, "epoch": epoch, "val_loss": val_loss})
                    if math.isfinite(val_loss) and (best is None or val_loss < best["val_loss"]):
                        best = {"epoch": epoch, "val_loss": val_loss,
                                "model": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()} if cfg.keep_best else None}
                    model.train()
                if interrupts.pending is not None and step < total:
                    checkpoint()
                    interrupts.fire()
                continue
            break
        if interval_losses:
            last_loss = float(torch.stack(interval_losses).double().mean())
        checkpoint(finished=True)
        if cfg.keep_best and best is not None and best["epoch"] != epoch:
            model.load_state_dict(best["model"])
            metrics.write({"step": step, "epoch": epoch, "event": "kept_best", "best_epoch": best["epoch"], "best_val_loss": best["val_loss"]})
        if interrupts.pending is not None:  # came after the last step: the run is finished and saved
            interrupts.fire()
    finally:
        # an interruption was checkpointed at the step it came after (_DeferredInterrupts)
        interrupts.__exit__(None, None, None)
        bar.close()
        metrics.close()
    return TrainResult(
        steps=step, epochs=epoch, final_loss=last_loss, val_loss=val_loss, skipped_steps=skipped,
        train_s=time.perf_counter() - t0, resumed_from=resumed_from, history=history,
        best_epoch=best["epoch"] if best else None, best_val_loss=best["val_loss"] if best else None,
        time_plan=time_plan,
    )


@torch.no_grad()
def evaluate_loss(model: nn.Module, loss_fn: LossFn, data: Sequence[torch.Tensor], batch_size: int) -> float:
    """Mean loss over a dataset in batches, in evaluation mode, without gradients.
    The model's random-number use here does not disturb the training stream."""
    state = _rng_state()
    model.eval()
    n = int(data[0].shape[0])
    total, count = 0.0, 0
    for start in range(0, n, batch_size):
        batch = [t[start : start + batch_size] for t in data]
        loss, _ = _as_loss(loss_fn(model, batch))
        k = int(batch[0].shape[0])
        total += float(loss) * k
        count += k
    _set_rng_state(state)
    return total / max(count, 1)
