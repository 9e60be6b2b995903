"""Training under torchrun with DistributedDataParallel (gloo on CPU): 2 processes, a few steps, and the
ranks end with identical weights."""

import json
import os
import subprocess
import sys

from tests.conftest import WATER


def test_torchrun_two_ranks_hold_identical_weights(tmp_path):
    cfg = tmp_path / "ddp.toml"
    cfg.write_text(
        f"""
[descriptor]
type = "se_e2_a"
sel = [46, 92]
[network]
fitting = [8]
embedding = [4, 8]
axis = 4
[data]
systems = ["{WATER / 'data_0'}"]
max_val_frames = 2
[training]
steps = 6
val_every = 3
checkpoint_every = 3
threads = 1
progress = false
out_dir = "{tmp_path / 'run'}"
"""
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
         "-m", "app.cli", "train", str(cfg)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    check = json.loads((tmp_path / "run" / "ddp_check.json").read_text())
    assert check["world_size"] == 2
    assert check["step"] == 6
    assert check["identical_weights"] is True
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
