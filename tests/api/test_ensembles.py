"""Ensembles: the mean of the members' own /predict results, DP-GEN's model deviation checked by hand on
the members' numbers, zero deviation for an ensemble of one, and ensembles that cannot serve refused with
their reason while the members serve."""

from __future__ import annotations

import json
import logging
import shutil

import msgpack
import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.inference.ensemble import Ensemble, member_frames
from app.inference.model import Frame
from app.main import create_app

from .conftest import LOCFRAME, SE, WATER_MOLECULE, make_settings, message, post, water_box, water_cluster

ENSEMBLES = {"water-ens": [SE, f"{LOCFRAME}/1"], "solo": [f"{SE}/1"], "ghost": [SE, "no-such-model"],
             SE: [LOCFRAME], "mixed": [SE, "nitrogen-se"]}
ALL = ["energy", "forces", "virial", "atomic_energies", "stress"]


@pytest.fixture(scope="module")
def ens(tiny_store, tmp_path_factory):
    """The tiny store plus 'nitrogen-se/1': the se model relabelled as a model for N and H."""
    store = tmp_path_factory.mktemp("ens") / "store"
    shutil.copytree(tiny_store, store)
    d = store / "nitrogen-se" / "1"
    shutil.copytree(store / SE / "1", d)
    m = json.loads((d / "manifest.json").read_text())
    m.update(name="nitrogen-se", type_map=["N", "H"])
    for section in (m["energy_bias"], m["onnx"]["inputs"], m["onnx"]["outputs"]):
        section["N"] = section.pop("O")
    m.pop("normalisation", None)
    m.pop("repulsion", None)
    (d / "manifest.json").write_text(json.dumps(m))
    with TestClient(create_app(make_settings(store, ensembles=ENSEMBLES))) as c:
        yield c


def frames():
    box = water_box()
    return [box, water_cluster(3)]


def results(client, model, properties=None, fs=None):
    body = {"model": model, "frames": fs or frames()}
    if properties:
        body["properties"] = properties
    r = post(client, body)
    assert r.status_code == 200, r.text
    return r.json()


def test_models_lists_the_ensembles_and_refuses_the_broken_ones(ens, caplog):
    body = ens.get("/models").json()
    assert body["ensembles"] == [
        {"name": "solo", "members": [f"{SE}/1"], "configured": [f"{SE}/1"], "type_map": ["O", "H"], "rcut": 6.0},
        {"name": "water-ens", "members": [f"{SE}/1", f"{LOCFRAME}/1"], "configured": [SE, f"{LOCFRAME}/1"],
         "type_map": ["O", "H"], "rcut": 6.0},
    ]
    refused = {r["path"]: r["reason"] for r in body["refused"]}
    assert set(refused) == {"ensembles.ghost", f"ensembles.{SE}", "ensembles.mixed"}
    assert "member 'no-such-model' is not loaded" in refused["ensembles.ghost"]
    assert "has the name of a model" in refused[f"ensembles.{SE}"]
    assert "same elements" in refused["ensembles.mixed"] and "N H" in refused["ensembles.mixed"]
    r = post(ens, {"model": "mixed", "frames": [WATER_MOLECULE]})
    assert r.status_code == 404 and "water-ens (ensemble)" in message(r)
    r = post(ens, {"model": SE, "frames": [WATER_MOLECULE]})  # the model, not the refused ensemble
    assert r.json()["model"] == {"name": SE, "version": "1"}


@pytest.mark.parametrize("periodic", [True, False])
def test_ensemble_is_the_mean_of_its_members(ens, periodic):
    props = ALL if periodic else [p for p in ALL if p != "stress"]
    fs = [water_box()] if periodic else [water_cluster(3), WATER_MOLECULE]
    out = results(ens, "water-ens", props, fs)
    assert out["model"] == {"name": "water-ens", "version": "ensemble", "members": [f"{SE}/1", f"{LOCFRAME}/1"]}
    a, b = results(ens, SE, props, fs)["results"], results(ens, LOCFRAME, props, fs)["results"]
    for k, res in enumerate(out["results"]):
        assert res["energy"] == pytest.approx((a[k]["energy"] + b[k]["energy"]) / 2, rel=1e-12)
        for p in props[1:]:
            mean = (np.array(a[k][p]) + np.array(b[k][p])) / 2
            np.testing.assert_allclose(res[p], mean, rtol=1e-10, atol=1e-12)
        assert set(res["model_deviation"]) == {"max_devi_f", "min_devi_f", "avg_devi_f", "devi_e",
                                               "max_devi_v", "min_devi_v", "avg_devi_v"}  # no devi_f unasked


def test_model_deviation_is_dpgens_by_hand(ens):
    out = results(ens, "water-ens", ["energy", "forces", "model_deviation"])["results"]
    a, b = results(ens, SE)["results"], results(ens, LOCFRAME)["results"]
    for k, res in enumerate(out):
        dev = res["model_deviation"]
        fa, fb = np.array(a[k]["forces"]), np.array(b[k]["forces"])
        n = len(fa)
        # two members: F_mean = (F_a + F_b)/2, so |F_a - F_mean| = |F_b - F_mean| = |F_a - F_b|/2 and
        # sigma_i = sqrt(mean over the two of that squared) = |F_a,i - F_b,i| / 2
        sigma = np.array([np.sqrt(((fa[i] - fb[i]) ** 2).sum()) / 2 for i in range(n)])
        np.testing.assert_allclose(dev["devi_f"], sigma, rtol=1e-10, atol=1e-14)
        assert dev["max_devi_f"] == pytest.approx(sigma.max(), rel=1e-10)
        assert dev["min_devi_f"] == pytest.approx(sigma.min(), rel=1e-10)
        assert dev["avg_devi_f"] == pytest.approx(sigma.mean(), rel=1e-10)
        assert dev["max_devi_f"] > 0
        assert dev["devi_e"] == pytest.approx(abs(a[k]["energy"] - b[k]["energy"]) / 2 / n, rel=1e-10)
        sv = np.abs(np.array(a[k]["virial"]) - np.array(b[k]["virial"])).ravel() / 2 / n  # std of 2 = |diff|/2
        assert dev["max_devi_v"] == pytest.approx(sv.max(), rel=1e-10)
        assert dev["min_devi_v"] == pytest.approx(sv.min(), rel=1e-10, abs=1e-15)
        assert dev["avg_devi_v"] == pytest.approx(np.sqrt((sv**2).sum()) / 3, rel=1e-10)


def test_ensemble_of_one_model_has_zero_deviation(ens):
    out = results(ens, "solo", ["energy", "forces", "model_deviation"])["results"]
    alone = results(ens, SE)["results"]
    for res, ref in zip(out, alone, strict=True):
        assert res["energy"] == ref["energy"]
        np.testing.assert_array_equal(res["forces"], ref["forces"])
        assert all(v == 0 for k, v in res["model_deviation"].items() if k != "devi_f")
        assert not np.any(res["model_deviation"]["devi_f"])


def test_model_deviation_of_a_single_model_is_a_422(ens):
    r = post(ens, {"model": SE, "frames": [WATER_MOLECULE], "properties": ["energy", "model_deviation"]})
    assert r.status_code == 422
    assert "properties: 'model_deviation' needs an ensemble" in message(r) and "solo, water-ens" in message(r)


def test_ensemble_over_msgpack_sends_devi_f_as_a_raw_array(ens):
    ref = results(ens, "water-ens", ["energy", "forces", "model_deviation"])["results"][0]
    body = msgpack.packb({"model": "water-ens", "frames": [water_box()], "properties": ["energy", "forces",
                                                                                      "model_deviation"]})
    r = ens.post("/predict", content=body, headers={"content-type": "application/msgpack",
                                                    "accept": "application/msgpack"})
    dev = msgpack.unpackb(r.content)["results"][0]["model_deviation"]
    devi_f = np.frombuffer(dev["devi_f"]["data"], "<f8").reshape(dev["devi_f"]["shape"])
    np.testing.assert_array_equal(devi_f, ref["model_deviation"]["devi_f"])
    assert dev["max_devi_f"] == ref["model_deviation"]["max_devi_f"]


def test_invalid_frame_in_an_ensemble_request_names_the_field(ens):
    r = post(ens, {"model": "water-ens", "frames": [WATER_MOLECULE, {**WATER_MOLECULE, "species": ["O", "H", "C"]}]})
    assert r.status_code == 422 and "frames[1].species[2]" in message(r)


def test_members_with_another_element_order_get_their_own_type_indices():
    class Member:
        def __init__(self, type_map):
            self.type_map, self.rcut, self.name, self.version = type_map, 6.0, "m", "1"

    a, b = Member(["O", "H"]), Member(["H", "O"])
    ens = Ensemble("e", [a, b])
    f = [Frame(types=np.array([0, 1, 1]), positions=np.zeros((3, 3)))]  # O H H in the ensemble's type_map
    assert member_frames(ens, a, f) is f
    np.testing.assert_array_equal(member_frames(ens, b, f)[0].types, [1, 0, 0])


def test_refused_ensemble_is_logged(tiny_store, caplog):
    with caplog.at_level(logging.ERROR), TestClient(create_app(make_settings(tiny_store, ensembles={"e": ["x"]}))):
        pass
    assert "refusing ensemble 'e': member 'x' is not loaded" in caplog.text
