"""The model registry behind /models: every valid model serves, a corrupted one is refused with its reason
(and the others still serve), and the default model follows the setting."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from fastapi.testclient import TestClient

from app.main import create_app

from .conftest import LOCFRAME, SE, WATER_MOLECULE, make_settings, message


def test_models_lists_every_model_with_its_metadata(client):
    body = client.get("/models").json()
    names = {(m["name"], m["version"]) for m in body["models"]}
    assert names == {(LOCFRAME, "1"), (SE, "1")}
    for m in body["models"]:
        assert m["type_map"] == ["O", "H"] and m["rcut"] == 6.0 and m["precision"] == "float64"
        assert m["descriptor"] in ("loc_frame", "se_e2_a") and isinstance(m["metrics"], dict)
    assert body["refused"] == []
    assert body["default_model"] == f"{LOCFRAME}/1"  # no water-se in this store: first by name
    assert client.get(f"/models/{SE}").json()["versions"] == ["1"]
    assert client.get(f"/models/{SE}/1").json()["descriptor"] == "se_e2_a"


@pytest.fixture
def damaged_store(tiny_store, tmp_path):
    """A copy of the tiny store with one truncated ONNX file and one manifest whose checksum was edited."""
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    for version in ("2", "3"):
        shutil.copytree(store / SE / "1", store / SE / version)
        m = json.loads((store / SE / version / "manifest.json").read_text())
        m["version"] = version
        (store / SE / version / "manifest.json").write_text(json.dumps(m))
    onnx = store / SE / "2" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:1000])
    manifest = store / LOCFRAME / "1" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["onnx"]["sha256"] = "0" * 64
    manifest.write_text(json.dumps(m))
    (store / "notes").mkdir()  # stray directories are ignored
    return store


def test_corrupted_models_are_refused_and_the_others_serve(damaged_store, caplog):
    with caplog.at_level(logging.ERROR), TestClient(create_app(make_settings(damaged_store))) as client:
        body = client.get("/models").json()
        assert [(m["name"], m["version"]) for m in body["models"]] == [(SE, "1"), (SE, "3")]
        refused = {r["path"].split("store/")[-1]: r["reason"] for r in body["refused"]}
        assert set(refused) == {f"{SE}/2", f"{LOCFRAME}/1"}
        assert "checksum mismatch" in refused[f"{SE}/2"] and "checksum mismatch" in refused[f"{LOCFRAME}/1"]
        assert body["default_model"] == f"{SE}/3"  # highest version of the first name
        r = client.post("/predict", json={"model": SE, "frames": [WATER_MOLECULE]})
        assert r.status_code == 200 and r.json()["model"] == {"name": SE, "version": "3"}
        r = client.post("/predict", json={"model": LOCFRAME, "frames": [WATER_MOLECULE]})
        assert r.status_code == 404 and f"{SE}/1, {SE}/3" in message(r)
        assert client.get("/ready").status_code == 200
    assert "refusing model" in caplog.text and "checksum mismatch" in caplog.text


def test_manifest_naming_another_model_is_refused(tiny_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(tiny_store / SE, store / "renamed")
    with TestClient(create_app(make_settings(store))) as client:
        body = client.get("/models").json()
        assert body["models"] == [] and "manifest says water-se-tiny/1" in body["refused"][0]["reason"]
        r = client.get("/ready")
        assert r.status_code == 503 and r.json()["reason"] == "no model loaded"
        r = client.post("/predict", json={"frames": [WATER_MOLECULE]})
        assert r.status_code == 503 and "no model is loaded" in message(r)
        assert client.get("/health").status_code == 200


def test_default_model_setting(tiny_store):
    with TestClient(create_app(make_settings(tiny_store, default_model=SE))) as client:
        assert client.post("/predict", json={"frames": [WATER_MOLECULE]}).json()["model"]["name"] == SE
        assert client.get(f"/models/{SE}").json()["default"] is True
    with TestClient(create_app(make_settings(tiny_store, default_model="missing"))) as client:
        r = client.get("/ready")
        assert r.status_code == 503 and "'missing'" in r.json()["reason"]
        r = client.post("/predict", json={"frames": [WATER_MOLECULE]})
        assert r.status_code == 404 and "'missing'" in message(r) and SE in message(r)
        assert client.post("/predict", json={"model": SE, "frames": [WATER_MOLECULE]}).status_code == 200


def test_water_se_is_the_default_when_present(tiny_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(tiny_store / LOCFRAME, store / LOCFRAME)
    shutil.copytree(tiny_store / SE / "1", store / "water-se" / "1")
    m = json.loads((store / "water-se" / "1" / "manifest.json").read_text())
    m["name"] = "water-se"
    (store / "water-se" / "1" / "manifest.json").write_text(json.dumps(m))
    with TestClient(create_app(make_settings(store))) as client:
        assert client.get("/models").json()["default_model"] == "water-se/1"


def test_missing_store_serves_health_but_is_not_ready(tmp_path):
    with TestClient(create_app(make_settings(tmp_path / "nowhere"))) as client:
        assert client.get("/health").json() == {"status": "ok"}
        assert client.get("/ready").status_code == 503


def test_models_show_compression_and_repulsion(client):
    models = {m["name"]: m for m in client.get("/models").json()["models"]}
    se = models["water-se-tiny"]
    assert se["compressed"]["table_max_rel_error"] < 1e-7 and se["compressed"]["bins"] > 0
    assert se["repulsion"]["type"] == "zbl" and "O-H" in se["repulsion"]["pairs"]
    assert models["water-locframe-tiny"]["compressed"] is None  # loc_frame has no tables
