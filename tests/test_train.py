"""The training loop: interrupted + resumed equals uninterrupted, NaN guard, schedules."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from partonic.cards import TrainingSection
from partonic.train import PLAN_FILL, TrainingError, load_checkpoint, lr_factor, plan_to_time_limit, train

TOY = textwrap.dedent(
    """
    import os, signal, sys, torch
    from torch import nn
    from partonic.cards import TrainingSection
    from partonic.train import train
    torch.set_num_threads(1)
    run_dir, kill_at, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    kill_with = getattr(signal, sys.argv[4] if len(sys.argv) > 4 else "SIGKILL")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 4, generator=gen)
    y = (x[:, :1] * 2 - x[:, 1:2] ** 2 + 0.1 * torch.randn(2000, 1, generator=gen))
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Dropout(0.1), nn.Linear(32, 1))
    calls = [0]
    def loss_fn(m, batch):
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), kill_with)  # SIGKILL: an abrupt death between checkpoints
        xb, yb = batch
        noise = 0.01 * torch.randn_like(xb)  # uses the global RNG, which must resume too
        return ((m(xb + noise) - yb) ** 2).mean()
    cfg = TrainingSection(batch_size=64, epochs=6, checkpoint_every=int(os.environ.get("CKPT_EVERY", 40)), log_every=10,
                          schedule={"name": "cosine", "warmup_steps": 20})
    res = train(model, loss_fn, (x[:1600], y[:1600]), cfg, run_dir, seed=11,
                val_data=(x[1600:], y[1600:]), resume=resume, progress=False)
    torch.save({k: v for k, v in model.state_dict().items()}, os.path.join(run_dir, "final.pt"))
    print("steps", res.steps, "resumed_from", res.resumed_from, "loss", res.final_loss)
    """
)


def run_toy(tmp_path, name, kill_at=-1, resume=False, kill_with="SIGKILL", ignore_sigint=False, checkpoint_every=40):
    script = tmp_path / "toy.py"
    script.write_text(TOY)
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None
    env = {**os.environ, "CKPT_EVERY": str(checkpoint_every)}
    return subprocess.run([sys.executable, str(script), str(tmp_path / name), str(kill_at), "1" if resume else "0", kill_with],
                          capture_output=True, text=True, preexec_fn=ignore, env=env)


def test_killed_and_resumed_run_matches_uninterrupted(tmp_path):
    full = run_toy(tmp_path, "full")
    assert full.returncode == 0, full.stderr
    assert "steps 150" in full.stdout  # 1600 // 64 = 25 steps × 6 epochs
    # loss calls: 25 training + 7 validation per epoch; call 120 is training step 99,
    # between the checkpoints at steps 80 and 120
    killed = run_toy(tmp_path, "cut", kill_at=120)
    assert killed.returncode == -signal.SIGKILL
    ckpt = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert ckpt["step"] == 80 and not ckpt["finished"]
    resumed = run_toy(tmp_path, "cut", resume=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed_from 80" in resumed.stdout
    a = torch.load(tmp_path / "full" / "final.pt")
    b = torch.load(tmp_path / "cut" / "final.pt")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the metrics log has no duplicated steps after the resume
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines() if "loss" in line and "val_loss" not in line]
    assert steps == sorted(set(steps)) and steps[-1] == 150
    full_losses = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    cut_losses = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("loss") for r in full_losses] == [r.get("loss") for r in cut_losses]


@pytest.mark.parametrize("kill_with, kill_at, step, every", [("SIGINT", 120, 99, 40), ("SIGTERM", 60, 50, 40), ("SIGINT", 185, 150, 40),
                                                           ("SIGKILL", 40, 25, 25)])
def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path, kill_with, kill_at, step, every):
    """Ctrl-C in the middle of a training step (loss call 120: step 98, after its noise
    is drawn and before its update), SIGTERM in an epoch's validation (call 60, epoch
    1), or Ctrl-C in the very last step (call 185): the checkpoint is written after that
    step or validation (after the last one, the run ends first, its last validation
    included), and the resumed run has the uninterrupted one's weights and every line of
    its log, validation losses too. The last case: a periodic checkpoint on an epoch's last
    step (25), its validation logged after it, then a hard kill: the resumed run validates
    again, and the line is in the log once."""
    full = run_toy(tmp_path, "full", checkpoint_every=every)
    assert full.returncode == 0, full.stderr
    cut = run_toy(tmp_path, "cut", kill_at=kill_at, kill_with=kill_with, checkpoint_every=every)
    assert cut.returncode != 0
    ckpt = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert ckpt["step"] == step and ckpt["finished"] == (step == 150)
    resumed = run_toy(tmp_path, "cut", resume=True, checkpoint_every=every)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed_from {step}" in resumed.stdout
    a, b = torch.load(tmp_path / "full" / "final.pt"), torch.load(tmp_path / "cut" / "final.pt")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    strip = lambda r: {k: v for k, v in r.items() if k != "time_s"}  # noqa: E731
    full_log = [strip(json.loads(line)) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    cut_log = [strip(json.loads(line)) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert cut_log == full_log


def test_an_ignored_sigint_stays_ignored(tmp_path):
    """A background job of a shell script inherits SIGINT ignored: Ctrl-C in that terminal
    must not stop its training."""
    run = run_toy(tmp_path, "bg", kill_at=120, kill_with="SIGINT", ignore_sigint=True)
    assert run.returncode == 0, run.stderr
    assert "steps 150" in run.stdout


def test_training_reduces_the_loss(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(1024, 2)
    y = x @ torch.tensor([[1.5], [-0.5]])
    model = torch.nn.Linear(2, 1)
    cfg = TrainingSection(batch_size=128, epochs=30, log_every=8, optimizer={"lr": 0.05})
    res = train(model, lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), (x, y), cfg, tmp_path, seed=1, progress=False)
    assert res.history[0]["loss"] > 0.1 and res.final_loss < 1e-3
    torch.testing.assert_close(model.weight.detach(), torch.tensor([[1.5, -0.5]]), atol=0.02, rtol=0)


def test_nan_guard_skips_lowers_rate_and_stops(tmp_path):
    x = torch.randn(256, 2)
    model = torch.nn.Linear(2, 1)
    calls = [0]

    def sometimes_nan(m, batch):
        calls[0] += 1
        loss = (m(batch[0]) ** 2).mean()
        return loss * float("nan") if calls[0] in (3, 4) else loss

    cfg = TrainingSection(batch_size=32, epochs=2, log_every=1, optimizer={"lr": 0.01}, schedule={"name": "constant"})
    res = train(model, sometimes_nan, (x,), cfg, tmp_path / "a", seed=1, progress=False)
    assert res.skipped_steps == 2 and res.steps == 16
    events = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [e["lr_scale"] for e in events if e.get("event") == "non_finite_skipped"] == [0.5, 0.25]
    assert events[-1]["lr"] == pytest.approx(0.01 * 0.25)
    assert all(torch.isfinite(p).all() for p in model.parameters())

    cfg = TrainingSection(batch_size=32, epochs=2, nan_guard={"max_bad_steps": 4})
    with pytest.raises(TrainingError, match="4 steps in a row gave a non-finite loss"):
        train(torch.nn.Linear(2, 1), lambda m, b: (m(b[0]) * float("inf")).mean(), (x,), cfg, tmp_path / "b", seed=1, progress=False)
    assert (tmp_path / "b" / "checkpoint.pt").exists()


def test_schedules():
    cfg = TrainingSection(schedule={"name": "cosine", "warmup_steps": 10, "min_lr_factor": 0.1})
    assert lr_factor(0, 110, cfg) == pytest.approx(0.1)
    assert lr_factor(10, 110, cfg) == pytest.approx(1.0)
    assert lr_factor(60, 110, cfg) == pytest.approx(0.55)
    assert lr_factor(110, 110, cfg) == pytest.approx(0.1)
    step = TrainingSection(schedule={"name": "step", "step_size": 5, "gamma": 0.5})
    assert [lr_factor(s, 100, step) for s in (0, 4, 5, 12)] == [1.0, 1.0, 0.5, 0.25]


def test_resume_with_a_different_model_is_a_clear_error(tmp_path):
    x = torch.randn(64, 2)
    cfg = TrainingSection(batch_size=32, epochs=1)
    train(torch.nn.Linear(2, 1), lambda m, b: m(b[0]).pow(2).mean(), (x,), cfg, tmp_path, seed=1, progress=False)
    with pytest.raises(TrainingError, match="does not fit this model"):
        train(torch.nn.Linear(2, 3), lambda m, b: m(b[0]).pow(2).mean(), (x,), cfg, tmp_path, seed=1, resume=True, progress=False)


def test_sample_weights_draw_events_in_proportion(tmp_path):
    # events 0..999: the first half with weight 3, the second with weight 1, one event
    # with weight 0; the loss records which events each batch holds
    n = 1000
    index = torch.arange(n, dtype=torch.float32)[:, None]
    weights = torch.cat([torch.full((500,), 3.0), torch.ones(500)])
    weights[7] = 0.0
    seen: list[torch.Tensor] = []
    model = torch.nn.Linear(1, 1)

    def loss_fn(m, batch):
        seen.append(batch[0][:, 0].long())
        return (m(batch[0]) ** 2).mean() * 0.0 + m.bias.sum() * 0.0

    cfg = TrainingSection(batch_size=100, epochs=20, log_every=50)
    train(model, loss_fn, (index,), cfg, tmp_path, seed=3, progress=False, sample_weights=weights)
    drawn = torch.cat(seen)
    assert drawn.numel() == 20 * n
    assert not (drawn == 7).any()
    # binomial: P(first half) = 1500 / 1999 · ... ≈ 0.75; 20 000 draws give σ ≈ 0.003
    p = 3 * 499 / (3 * 499 + 500)
    share = (drawn < 500).double().mean().item()
    assert abs(share - p) < 4 * (p * (1 - p) / drawn.numel()) ** 0.5
    with pytest.raises(TrainingError, match="sample_weights"):
        train(model, loss_fn, (index,), cfg, tmp_path / "bad", seed=3, progress=False, sample_weights=-weights)


class _Shift(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.zeros(()))


def test_keep_best_ends_with_the_epoch_of_lowest_validation_loss(tmp_path):
    # θ walks from 0 towards the training target 1 (constant-rate SGD, one step per epoch:
    # θ_k = 1 − 0.8^k); the validation target 0.3 is passed at epoch 2 (θ = 0.36), so the
    # validation loss (θ − 0.3)² is lowest there and rises after
    x, v = torch.ones(8, 1), torch.full((8, 1), 0.3)
    loss = lambda m, b: ((m.theta - b[0]) ** 2).mean()
    cfg = dict(batch_size=8, epochs=6, optimizer={"name": "sgd", "lr": 0.1}, schedule={"name": "constant"})
    last = _Shift()
    res = train(last, loss, (x,), TrainingSection(**cfg), tmp_path / "last", seed=1, val_data=(v,), progress=False)
    assert res.best_epoch == 2 and res.best_val_loss == pytest.approx(0.06**2, rel=1e-5)
    assert last.theta.item() == pytest.approx(1 - 0.8**6, rel=1e-5)
    kept = _Shift()
    res = train(kept, loss, (x,), TrainingSection(**cfg, keep_best=True), tmp_path / "kept", seed=1, val_data=(v,), progress=False)
    assert kept.theta.item() == pytest.approx(0.36, rel=1e-5) and res.summary(kept_best=True)["model_from_epoch"] == 2
    events = [json.loads(line) for line in (tmp_path / "kept" / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "kept_best" and events[-1]["best_epoch"] == 2
    # the best state travels in the checkpoint: a resumed (already finished) run keeps it
    again = _Shift()
    train(again, loss, (x,), TrainingSection(**cfg, keep_best=True), tmp_path / "kept", seed=1, val_data=(v,), resume=True, progress=False)
    assert again.theta.item() == pytest.approx(0.36, rel=1e-5)
    with pytest.raises(TrainingError, match="keep_best .* needs validation events"):
        train(_Shift(), loss, (x,), TrainingSection(**cfg, keep_best=True), tmp_path / "none", seed=1, progress=False)


def test_a_time_limit_fits_the_steps_and_the_schedule_to_the_budget(tmp_path):
    # every step sleeps 5 ms, so 1000 epochs of 25 steps would take over two minutes;
    # a 1.2 s budget must end the training near 1.2 s with the cosine run to its end
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1600, 4, generator=gen)
    y = x[:, :1] * 2
    torch.manual_seed(3)
    model = torch.nn.Linear(4, 1)

    def loss_fn(m, batch):
        time.sleep(0.005)
        return ((m(batch[0]) - batch[1]) ** 2).mean()

    limit = 1.2
    cfg = TrainingSection(batch_size=64, epochs=1000, log_every=5, time_limit_s=limit,
                          schedule={"name": "cosine"})
    res = train(model, loss_fn, (x[:1400], y[:1400]), cfg, tmp_path / "run", seed=2,
                val_data=(x[1400:], y[1400:]), progress=False)
    plan = res.time_plan
    assert plan["card_steps"] == 1000 * (1400 // 64)
    # the plan's budget share at >= 5 ms per step: at most 228 steps, and well above the
    # 45 steps timed before the plan
    assert 45 < res.steps <= int(PLAN_FILL * limit / 0.005) + 1
    assert plan["s_per_step"] >= 0.005
    if not plan["stopped_by_limit"]:  # a loaded machine may end it by the limit instead
        assert res.steps == plan["planned_steps"]
        last_lr = [r["lr"] for r in res.history][-1]
        # the schedule reached its end (the cosine's floor, min_lr_factor), not cut mid-way
        assert last_lr == pytest.approx(cfg.optimizer.lr * lr_factor(res.steps - 1, res.steps, cfg))
        assert last_lr < 0.02 * cfg.optimizer.lr
    assert res.train_s < limit + 0.5  # one step and a validation pass past it at most
    report = res.summary()
    assert report["time_limit"]["limit_s"] == limit
    # a resumed run keeps the planned length: nothing is left to train
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["total_steps"] == res.steps and ckpt["time_plan"] == plan
    again = train(model, loss_fn, (x[:1400], y[:1400]), cfg, tmp_path / "run", seed=2,
                  val_data=(x[1400:], y[1400:]), resume=True, progress=False)
    assert again.steps == res.steps and again.resumed_from == res.steps


def test_the_time_plan_counts_validation_and_keeps_to_the_card():
    # 100 s budget, 10 s spent at step 50, 0.1 s a step: 0.95 * 100 - 10 = 85 s are 850 steps more
    assert plan_to_time_limit(100.0, 10.0, 50, 0.1, 0.0, 1000, 10_000) == 900
    # a 10 s validation pass every 100 steps adds 0.1 s a step: half as many
    assert plan_to_time_limit(100.0, 10.0, 50, 0.1, 10.0, 100, 10_000) == 475
    assert plan_to_time_limit(100.0, 10.0, 50, 0.1, 0.0, 1000, 300) == 300  # never past the card
    assert plan_to_time_limit(100.0, 99.0, 50, 0.1, 0.0, 1000, 10_000) == 50  # spent: stop now
