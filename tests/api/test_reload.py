"""Hot reload and model integrity: a version dropped into the store becomes servable while requests keep
flowing (none fails), damaged models are refused with a logged reason at start-up and on reload while the
others serve, and a request running on a removed model finishes on it."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time

import pytest
from fastapi.testclient import TestClient

from app.main import create_app

from .conftest import LOCFRAME, SE, WATER_MOLECULE, make_settings, message, post

TOKEN = "reload-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def add_version(store, name: str, src: str, version: str):
    """Copy <store>/<name>/<src> to <store>/<name>/<version>, with the manifest's version changed."""
    d = store / name / version
    shutil.copytree(store / name / src, d)
    m = json.loads((d / "manifest.json").read_text())
    m["version"] = version
    (d / "manifest.json").write_text(json.dumps(m))
    return d


def _edit_manifest(d, edit):
    m = json.loads((d / "manifest.json").read_text())
    edit(m)
    (d / "manifest.json").write_text(json.dumps(m))


def _only_oxygen(m):
    """A manifest for O alone on a graph with inputs for O and H: a model for other elements (se_e2_a)."""
    m["type_map"] = ["O"]
    for k in ("energy_bias", "normalisation"):
        m.get(k, {}).pop("H", None)
    m["onnx"]["inputs"].pop("H")
    m["onnx"]["outputs"].pop("H")
    m["descriptor"]["sel"] = m["descriptor"]["sel"][:1]
    m.pop("repulsion", None)


def _fake_element(m):
    m["type_map"] = ["O", "Xx"]
    for k in ("energy_bias", "normalisation"):
        if "H" in m.get(k, {}):
            m[k]["Xx"] = m[k].pop("H")
    for k in ("inputs", "outputs"):
        m["onnx"][k]["Xx"] = m["onnx"][k].pop("H")


def _wider_sel(m):  # se_e2_a
    m["descriptor"]["sel"] = [s + 10 for s in m["descriptor"]["sel"]]


def _truncate_and_fix_checksum(d):
    from app.inference.model import sha256_file

    onnx = d / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:2000])
    _edit_manifest(d, lambda m: m["onnx"].__setitem__("sha256", sha256_file(onnx)))


DAMAGE = {
    # name: (how, fragment of the refusal reason)
    "truncated_onnx": (lambda d: (d / "model.onnx").write_bytes((d / "model.onnx").read_bytes()[:2000]), "checksum mismatch"),
    "truncated_onnx_with_its_checksum": (_truncate_and_fix_checksum, "onnxruntime cannot load it"),
    "checksum_mismatch": (lambda d: _edit_manifest(d, lambda m: m["onnx"].__setitem__("sha256", "f" * 64)), "checksum mismatch"),
    "graph_for_other_elements": (lambda d: _edit_manifest(d, _only_oxygen), "2 element inputs but the manifest's type_map"),
    "not_an_element": (lambda d: _edit_manifest(d, _fake_element), "not element symbols: ['Xx']"),
    "descriptor_disagrees_with_graph": (lambda d: _edit_manifest(d, _wider_sel), "descriptor parameters and graph disagree"),
}


@pytest.fixture
def store(tiny_store, tmp_path):
    s = tmp_path / "store"
    shutil.copytree(tiny_store, s)
    return s


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_model_is_refused_at_start_up_and_on_reload(store, damage, caplog):
    how, reason = DAMAGE[damage]
    how(add_version(store, SE, "1", "2"))
    with caplog.at_level(logging.ERROR), TestClient(create_app(make_settings(store, admin_token=TOKEN))) as client:
        refused = client.get("/models").json()["refused"]
        assert [r["path"].split("store/")[-1] for r in refused] == [f"{SE}/2"]
        assert reason in refused[0]["reason"]
        assert "refusing model water-se-tiny/2" in caplog.text and reason in caplog.text
        assert post(client, {"model": SE, "frames": [WATER_MOLECULE]}).json()["model"]["version"] == "1"

        caplog.clear()
        how(add_version(store, SE, "1", "3"))  # the same damage, found by a reload
        r = client.post("/admin/reload", headers=AUTH)
        assert r.status_code == 200
        body = r.json()
        assert body["added"] == [] and body["removed"] == []
        assert {x["path"].split("store/")[-1] for x in body["refused"]} == {f"{SE}/2", f"{SE}/3"}
        assert f"refusing model {SE}/3" in caplog.text and reason in caplog.text
        for model in (SE, LOCFRAME):  # the others serve
            r = post(client, {"model": model, "frames": [WATER_MOLECULE]})
            assert r.status_code == 200 and r.json()["model"]["version"] == "1"


def test_new_version_becomes_servable_while_requests_keep_flowing(store):
    """Threads post /predict without pause while the store changes and is reloaded five times: a new
    version appears, a damaged one is refused, a model is removed. Not one request fails."""
    settings = make_settings(store, admin_token=TOKEN, batch_wait_ms=1)
    with TestClient(create_app(settings)) as client:
        stop, statuses, versions = threading.Event(), [], set()

        def hammer(model):
            while not stop.is_set():
                r = post(client, {"model": model, "frames": [WATER_MOLECULE]})
                statuses.append(r.status_code)
                if r.status_code == 200:
                    versions.add((model, r.json()["model"]["version"]))

        threads = [threading.Thread(target=hammer, args=(m,)) for m in (SE, SE, f"{LOCFRAME}/1", f"{SE}/1")]
        for t in threads:
            t.start()
        time.sleep(0.3)
        summaries = []
        for step in range(5):
            if step == 1:
                add_version(store, SE, "1", "2")  # a new version: servable after this reload
            if step == 2:
                d = add_version(store, LOCFRAME, "1", "7")
                (d / "model.onnx").write_bytes(b"truncated")
            if step == 3:
                add_version(store, LOCFRAME, "1", "3")
            if step == 4:
                shutil.rmtree(store / LOCFRAME / "3")  # removed again
            r = client.post("/admin/reload", headers=AUTH)
            assert r.status_code == 200, r.text
            summaries.append(r.json())
            time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join(30)

        assert len(statuses) > 20 and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
        assert summaries[1]["added"] == [f"{SE}/2"]
        assert summaries[3]["added"] == [f"{LOCFRAME}/3"] and summaries[4]["removed"] == [f"{LOCFRAME}/3"]
        assert all(s["replaced"] == [] for s in summaries)  # unchanged models are kept, not reloaded
        assert (SE, "2") in versions and (SE, "1") in versions  # 'water-se-tiny' moved to version 2
        assert post(client, {"model": SE, "frames": [WATER_MOLECULE]}).json()["model"]["version"] == "2"
        body = client.get("/models").json()
        assert [r["path"].split("store/")[-1] for r in body["refused"]] == [f"{LOCFRAME}/7"]
        assert 'dpserve_reloads_total{result="ok"} 5.0' in client.get("/metrics").text


def test_request_on_a_removed_model_finishes_on_it(store, monkeypatch):
    with TestClient(create_app(make_settings(store, admin_token=TOKEN))) as client:
        service = client.app.state.service
        model = service.registry.find(LOCFRAME)
        batcher = service.batchers[(LOCFRAME, "1")]
        started, original = threading.Event(), model.predict

        def slow(frames, **kw):
            started.set()
            time.sleep(1.0)
            return original(frames, **kw)

        monkeypatch.setattr(model, "predict", slow)
        answers = []
        t = threading.Thread(target=lambda: answers.append(post(client, {"model": LOCFRAME, "frames": [WATER_MOLECULE]})))
        t.start()
        assert started.wait(10)
        shutil.rmtree(store / LOCFRAME)
        r = client.post("/admin/reload", headers=AUTH)
        assert r.json()["removed"] == [f"{LOCFRAME}/1"]
        r = post(client, {"model": LOCFRAME, "frames": [WATER_MOLECULE]})
        assert r.status_code == 404 and LOCFRAME not in message(r).split("available:")[1]
        assert not batcher.closing  # still in use by the request that started on it
        t.join(30)
        assert answers[0].status_code == 200 and answers[0].json()["model"] == {"name": LOCFRAME, "version": "1"}
        deadline = time.monotonic() + 10
        while not batcher.closing and time.monotonic() < deadline:  # then its batcher is stopped
            time.sleep(0.02)
        assert batcher.closing
