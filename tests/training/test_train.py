"""Training runs end to end: the loss falls, checkpoints resume, several systems of different sizes train
together, the CLI evaluates an exported model."""

import csv
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SHARED, _tiny_config
from training.config import config_from_dict
from training.train import Trainer


def test_tiny_training_lowers_the_loss(tmp_path):
    cfg = _tiny_config("loc_frame", tmp_path / "run", steps=60)
    cfg.training.val_every = 20
    tr = Trainer(cfg, log=lambda *a: None)
    before = tr.validate()
    tr.run()
    after = tr.validate()
    assert after["rmse_f_val"] < 0.8 * before["rmse_f_val"]
    rows = list(csv.DictReader(open(tmp_path / "run" / "lcurve.csv")))
    assert [int(r["step"]) for r in rows] == [20, 40, 60]
    assert (tmp_path / "run" / "lcurve.png").stat().st_size > 1000
    assert (tmp_path / "run" / "parity.png").stat().st_size > 1000


def test_resume_continues_from_checkpoint(tmp_path):
    cfg = _tiny_config("se_e2_a", tmp_path / "run", steps=10)
    tr = Trainer(cfg, log=lambda *a: None)
    tr.run()
    w = [p.detach().clone() for p in tr.net.parameters()]
    cfg.training.steps = 20
    tr2 = Trainer(cfg, resume=str(tmp_path / "run" / "checkpoint.pt"), log=lambda *a: None)
    assert tr2.step == 10
    assert all(np.allclose(a.numpy(), b.detach().numpy()) for a, b in zip(w, tr2.net.parameters(), strict=True))
    tr2.run()
    assert tr2.step == 20
    assert tr2.cfg.to_dict() == cfg.to_dict()


def test_several_systems_of_different_sizes_train_together(tmp_path):
    cfg = config_from_dict(
        {
            "descriptor": {"type": "se_e2_a", "rcut": 6.0, "rcut_smth": 0.5, "sel": [6, 6, 6]},
            "network": {"fitting": [16], "embedding": [4, 8], "axis": 4},
            "data": {"systems": [str(SHARED / "data" / "nopbc_combustion")], "type_map": ["C", "H", "O"],
                     "max_val_frames": 8},
            "training": {"steps": 30, "batch_atoms": 40, "val_every": 10, "out_dir": str(tmp_path / "c"), "progress": False},
        }
    )
    tr = Trainer(cfg, log=lambda *a: None)
    assert len(tr.systems) == 3 and sorted(s.natoms for s in tr.systems) == [7, 8, 10]
    # least-squares bias over three compositions is unique and close to the data README's figures
    assert np.allclose(tr.energy_bias, [-1029.56, -13.97, -2047.91], atol=1.0)
    row = tr.run()
    assert np.isfinite(row["rmse_f_val"])


def test_dpserve_test_prints_dp_test_figures(tiny_store, capsys):
    from app.cli import main
    from tests.conftest import WATER

    main(["test", "-m", str(tiny_store / "water-locframe-tiny" / "1"), "-s", str(WATER / "data_1"), "-n", "2"])
    out = capsys.readouterr().out
    for label in ("Energy RMSE", "Energy RMSE/Natoms", "Force  RMSE"):
        assert label in out


def test_time_budget_schedule_keeps_deepmd_stairs(tmp_path):
    """With a time budget the rate falls in stairs of decay_steps (counted from the measured step rate),
    ending at lr_stop; the stair count survives a resume."""
    cfg = _tiny_config("loc_frame", tmp_path / "run", steps=10)
    cfg.training.time_budget_min = 1.0
    cfg.training.decay_steps = 1000
    tr = Trainer(cfg, log=lambda *a: None)
    tc = cfg.training
    tr.step, tr.elapsed = 50, 1.0
    assert tr.lr() == tc.lr_start  # stairs not fixed yet: first stair
    tr.step, tr.elapsed = 400, 6.0  # 400 steps in 6 s of 60: 4000 steps expected -> 4 stairs
    assert tr.lr() == tc.lr_start
    assert tr.nstairs == 4
    tr.elapsed = 14.9
    assert tr.lr() == tc.lr_start
    tr.elapsed = 15.1
    assert np.isclose(tr.lr(), tc.lr_start * (tc.lr_stop / tc.lr_start) ** 0.25)
    tr.elapsed = 60.0
    assert np.isclose(tr.lr(), tc.lr_stop)
    tr.save()
    tr2 = Trainer(cfg, resume=str(tmp_path / "run" / "checkpoint.pt"), log=lambda *a: None)
    assert tr2.nstairs == 4


def test_weight_averaging_is_what_validation_and_export_see(tmp_path):
    import torch

    cfg = _tiny_config("loc_frame", tmp_path / "run", steps=15)
    cfg.training.ema_decay = 0.8
    tr = Trainer(cfg, log=lambda *a: None)
    tr.run()
    st = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    names = [k for k, _ in tr.net.named_parameters()]
    # exported weights are the average, the optimiser's weights are kept for resuming
    for k, e in zip(names, tr.ema, strict=True):
        assert torch.equal(st["net_state"][k], e)
    assert any(not torch.equal(st["net_state"][k], st["train_state"][k]) for k in names)
    live = [p.detach().clone() for p in tr.net.parameters()]
    with tr.averaged_weights():
        assert all(torch.equal(p, e) for p, e in zip(tr.net.parameters(), tr.ema, strict=True))
    assert all(torch.equal(p, q) for p, q in zip(tr.net.parameters(), live, strict=True))
    tr2 = Trainer(cfg, resume=str(tmp_path / "run" / "checkpoint.pt"), log=lambda *a: None)
    assert all(torch.equal(p, q) for p, q in zip(tr2.net.parameters(), live, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(tr2.ema, tr.ema, strict=True))


def test_weight_decay_shrinks_weights_towards_zero(tmp_path):
    """AdamW's decoupled decay: with a zero loss gradient the weights shrink by (1 - lr * wd) per step."""
    import torch

    cfg = _tiny_config("loc_frame", tmp_path / "run", steps=1)
    cfg.training.weight_decay = 0.5
    tr = Trainer(cfg, log=lambda *a: None)
    assert isinstance(tr.opt, torch.optim.AdamW)
    before = [p.detach().clone() for p in tr.net.parameters()]
    for p in tr.net.parameters():
        p.grad = torch.zeros_like(p)
    tr.opt.step()
    lr = cfg.training.lr_start
    for b, p in zip(before, tr.net.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), b * (1 - lr * 0.5))


def test_short_schedules_still_decay_as_deepmd_kit():
    from training.train import _stairs

    assert _stairs(30000, 5000) == 6
    assert _stairs(4000, 5000) == 40  # decay_steps >= total: deepmd-kit's fallback of 100 steps
    assert np.isclose(_stairs(500, 5000), 500 / 6)  # very short: total // 100 + 1 = 6 steps per stair
    assert _stairs(1, 5000) == 1
    assert _stairs(7000, 5000) == 1.4  # not rounded down to 1 stair (that kept lr_start to the very end)


@pytest.mark.parametrize("total,decay", [(7000, 5000), (30000, 5000), (12345, 1000), (4000, 5000)])
def test_step_schedule_is_deepmd_kits_exponential_staircase(tmp_path, total, decay):
    """lr(step) = lr_start * r ** (step // d) with r = (lr_stop / lr_start) ** (d / total) (deepmd-kit)."""
    cfg = _tiny_config("loc_frame", tmp_path / "run", steps=total)
    cfg.training.decay_steps = decay
    tr = Trainer(cfg, log=lambda *a: None)
    tc = cfg.training
    d = decay if decay < total else (100 if total // 10 > 100 else total // 100 + 1)
    rate = (tc.lr_stop / tc.lr_start) ** (d / total)
    for step in (0, d - 1, d, total // 2, total - 1):
        tr.step = step
        assert np.isclose(tr.lr(), tc.lr_start * rate ** (step // d), rtol=1e-12), step


def test_stop_step_ends_the_run_early_on_the_full_schedule(tmp_path):
    """stop_step ends a run before its schedule is over; the learning rate it reached is the one of the full
    schedule (a shipped model can be 'the 108-minute recipe stopped at step N')."""
    full = _tiny_config("loc_frame", tmp_path / "full", steps=40)
    full.training.decay_steps = 0
    ref = Trainer(full, log=lambda *a: None)
    ref.step = 25
    lr_at_25 = ref.lr()
    assert lr_at_25 > full.training.lr_stop * 1.01  # the full schedule is not over at step 25
    cfg = _tiny_config("loc_frame", tmp_path / "run", steps=40)
    cfg.training.decay_steps, cfg.training.stop_step = 0, 25
    tr = Trainer(cfg, log=lambda *a: None)
    row = tr.run()
    assert tr.step == 25 and row["step"] == 25  # the last step is validated
    assert abs(tr.lr() - lr_at_25) < 1e-15
    rows = list(csv.DictReader(open(tmp_path / "run" / "lcurve.csv")))
    assert [int(r["step"]) for r in rows] == [10, 20, 25]
    assert (tmp_path / "run" / "parity.png").is_file()
    assert Trainer(cfg, resume=str(tmp_path / "run" / "checkpoint.pt"), log=lambda *a: None).step == 25


def test_ctrl_c_finishes_the_step_and_keeps_checkpoint_and_plots(tmp_path):
    """SIGINT during `dpserve train`: the run validates, writes its checkpoint and plots and exits 0; the
    checkpoint resumes where it stopped."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import torch
    import yaml

    cfg = _tiny_config("loc_frame", tmp_path / "run", steps=100000)
    cfg.training.val_every = cfg.training.checkpoint_every = 20
    conf = tmp_path / "cfg.yaml"
    conf.write_text(yaml.safe_dump(cfg.to_dict()))
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "train", str(conf), "--threads", "1"],
                            cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, text=True)
    lcurve = tmp_path / "run" / "lcurve.csv"
    deadline = time.monotonic() + 120
    while not lcurve.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "SIGINT: stopped at step" in out and "--resume" in out
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert 20 <= state["step"] < 100000
    last = list(csv.DictReader(open(lcurve)))[-1]
    assert int(last["step"]) == state["step"]  # the step it stopped at was validated
    assert (tmp_path / "run" / "lcurve.png").is_file() and (tmp_path / "run" / "parity.png").is_file()
