"""The shipped model store: every bundled model loads (manifest and checksum verified), carries its
training record and held-out metrics, and the service started with default settings serves them with
water-se as the default model, so `dpserve serve` answers out of the box."""

import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.inference.model import DeepPotModel, Frame
from app.main import create_app

STORE = Path(__file__).resolve().parents[1] / "model_store"
SHIPPED = {"water-locframe": ("loc_frame", ["O", "H"]), "water-se": ("se_e2_a", ["O", "H"]),
           "combustion-se": ("se_e2_a", ["C", "H", "O"])}


def _latest(name):
    versions = sorted((d for d in (STORE / name).iterdir() if (d / "manifest.json").is_file()), key=lambda d: d.name)
    assert versions, f"no version of {name} in {STORE}"
    return versions[-1]


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_model_loads_with_its_training_record(name):
    d = _latest(name)
    m = json.loads((d / "manifest.json").read_text())
    kind, type_map = SHIPPED[name]
    assert m["descriptor"]["type"] == kind and m["type_map"] == type_map
    assert m["onnx"]["precision"] == "float32"
    assert m["export_check"]["max_force_diff_eV_per_A"] < 1e-3  # float32 graph vs torch float64
    val = m["metrics"]["validation"]
    assert val["frames"] >= 8 and np.isfinite(val["force_rmse"])
    for f in ("config.json", "lcurve.csv", "lcurve.png", "parity.png"):
        assert (d / f).is_file(), f"{d / f} missing"
    model = DeepPotModel.load(d, device="cpu")
    # an isolated molecule of the model's first two elements: finite energy, forces summing to zero
    types = np.array([0, 1, 1])
    pos = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]])
    r = model.predict([Frame(types, pos)])[0]
    assert np.isfinite(r["energy"]) and np.abs(r["forces"].sum(0)).max() < 1e-4


def test_service_with_default_settings_serves_the_shipped_models():
    with TestClient(create_app(Settings(model_store=STORE))) as client:
        body = client.get("/models").json()
        names = {m["name"] for m in body["models"]}
        assert set(SHIPPED) <= names and body["default_model"].startswith("water-se")
        r = client.post("/predict", json={"frames": [{"species": ["O", "H", "H"],
                                                      "positions": [[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]}]})
        assert r.status_code == 200, r.text
        assert r.json()["model"]["name"] == "water-se"
