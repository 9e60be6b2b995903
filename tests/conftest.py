"""Shared fixtures: a tiny model store with one loc_frame and one se_e2_a water model, trained for a few
steps on real water frames and exported exactly as shipped models are (so the whole pipeline runs)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WATER = SHARED / "data" / "water"


def _tiny_config(kind: str, out_dir: Path, steps: int = 20):
    from training.config import config_from_dict

    desc = {"type": kind, "rcut": 6.0}
    if kind == "loc_frame":
        desc.update(sel_a=[16, 32], sel_r=[30, 60], axis_rule={"O": [["H", 0], ["H", 1]], "H": [["O", 0], ["H", 0]]})
    else:
        desc.update(rcut_smth=0.5, sel=[46, 92])
    return config_from_dict(
        {
            "descriptor": desc,
            "network": {"fitting": [16, 16], "embedding": [4, 8], "axis": 4},
            "data": {"systems": [str(WATER / "data_0")], "val_fraction": 0.05, "max_val_frames": 2},
            "training": {"steps": steps, "val_every": 10, "checkpoint_every": 10, "out_dir": str(out_dir), "progress": False},
        }
    )


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> Path:
    """A model store holding water-locframe-tiny/1 and water-se-tiny/1 (float64 graphs, 20 training steps)."""
    from training.export import export_checkpoint
    from training.train import Trainer

    base = tmp_path_factory.mktemp("tiny")
    store = base / "store"
    store.mkdir()
    for kind, name in (("loc_frame", "water-locframe-tiny"), ("se_e2_a", "water-se-tiny")):
        cfg = _tiny_config(kind, base / name)
        Trainer(cfg, log=lambda *a: None).run()
        export_checkpoint(base / name / "checkpoint.pt", name, "1", store=store, precision="float64",
                          check_frames=2, log=lambda *a: None)
    return store
