"""POST /predict as physics: finite-difference forces, strain-derivative stress, JSON = msgpack, and results
that do not depend on what a frame was batched with."""

from __future__ import annotations

import threading

import msgpack
import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.schemas import raw_array

from .conftest import LOCFRAME, SE, WATER_MOLECULE, make_settings, post, water_box, water_cluster

MODELS = [SE, LOCFRAME]


def predict(client, frames, model, properties=None) -> list[dict]:
    body = {"model": model, "frames": frames}
    if properties:
        body["properties"] = properties
    r = post(client, body)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == {"name": model, "version": "1"}
    return r.json()["results"]


def unpack(a):
    """msgpack raw array -> numpy, or nested list -> numpy."""
    if isinstance(a, dict):
        return np.frombuffer(a["data"], dtype="<f8").reshape(a["shape"])
    return np.asarray(a)


@pytest.mark.parametrize("model", MODELS)
def test_default_properties_are_energy_forces_virial(client, model):
    (res,) = predict(client, [WATER_MOLECULE], model)
    assert set(res) == {"energy", "forces", "virial", "n_dropped"}
    assert np.shape(res["forces"]) == (3, 3) and np.shape(res["virial"]) == (3, 3)
    assert res["n_dropped"] == 0


@pytest.mark.parametrize("model", MODELS)
def test_forces_match_finite_difference(client, model):
    """F = -dE/dr by central differences on an isolated 4-molecule water cluster (float64 graphs), all
    36 displaced frames in one request."""
    cluster = water_cluster(4)
    pos = np.array(cluster["positions"])
    h = 1e-5
    frames = [cluster]
    for a in range(len(pos)):
        for x in range(3):
            for sign in (1, -1):
                p = pos.copy()
                p[a, x] += sign * h
                frames.append({"species": cluster["species"], "positions": p.tolist()})
    res = predict(client, frames, model)
    forces = np.array(res[0]["forces"])
    e = np.array([r["energy"] for r in res[1:]]).reshape(len(pos), 3, 2)
    fd = -(e[..., 0] - e[..., 1]) / (2 * h)
    scale = np.abs(forces).max()
    assert scale > 1e-3
    np.testing.assert_allclose(forces, fd, atol=1e-6 * (1 + scale), rtol=0)  # observed: ~3e-8 eV/A
    np.testing.assert_allclose(forces.sum(0), 0, atol=1e-10 * max(scale, 1.0))  # no net force


def test_stress_is_the_strain_derivative_of_the_energy(client):
    """sigma = (1/V) dE/d(epsilon) = -virial/V (ASE sign, Voigt xx yy zz yz xz xy), on the periodic box."""
    box = water_box()
    pos, cell = np.array(box["positions"]), np.array(box["cell"])
    (res,) = predict(client, [box], SE, ["energy", "virial", "stress"])
    stress = np.array(res["stress"])
    volume = abs(np.linalg.det(cell))
    np.testing.assert_allclose(stress, -np.array(res["virial"])[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]] / volume, rtol=1e-12)
    h = 1e-5
    frames = []
    for a, b in [(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)]:
        for sign in (1, -1):
            eps = np.zeros((3, 3))
            eps[a, b] = eps[b, a] = sign * h / (1 if a == b else 2)
            strain = np.eye(3) + eps
            frames.append({**box, "positions": (pos @ strain).tolist(), "cell": (cell @ strain).tolist()})
    e = np.array([r["energy"] for r in predict(client, frames, SE, ["energy"])]).reshape(6, 2)
    fd = (e[:, 0] - e[:, 1]) / (2 * h) / volume
    np.testing.assert_allclose(stress, fd, atol=1e-6 * max(np.abs(stress).max(), 1e-3))


@pytest.mark.parametrize("model", MODELS)
def test_atomic_energies_sum_to_the_energy(client, model):
    (res,) = predict(client, [water_box()], model, ["energy", "atomic_energies"])
    assert set(res) == {"energy", "atomic_energies", "n_dropped"}
    assert len(res["atomic_energies"]) == 192
    assert np.sum(res["atomic_energies"]) == pytest.approx(res["energy"], rel=1e-12)


@pytest.mark.parametrize("model", MODELS)
def test_json_and_msgpack_give_the_same_numbers(client, model):
    box = water_box()
    props = ["energy", "forces", "virial", "stress", "atomic_energies"]
    (ref,) = predict(client, [box], model, props)
    raw_frame = {"species": box["species"], "positions": raw_array(np.array(box["positions"])),
                 "cell": raw_array(np.array(box["cell"])), "pbc": box["pbc"]}
    for frame in (box, raw_frame):  # nested lists and raw arrays, both in msgpack
        body = msgpack.packb({"model": model, "frames": [frame], "properties": props}, use_bin_type=True)
        r = client.post("/predict", content=body,
                        headers={"content-type": "application/msgpack", "accept": "application/msgpack"})
        assert r.status_code == 200 and r.headers["content-type"] == "application/msgpack"
        out = msgpack.unpackb(r.content, raw=False)
        assert out["model"] == {"name": model, "version": "1"}
        (res,) = out["results"]
        assert isinstance(res["forces"], dict) and res["forces"]["shape"] == [192, 3]
        assert res["energy"] == pytest.approx(ref["energy"], rel=1e-14)
        for k in ("forces", "virial", "stress", "atomic_energies"):
            np.testing.assert_allclose(unpack(res[k]), np.array(ref[k]), rtol=1e-12, atol=1e-12)


def test_msgpack_request_with_json_response(client):
    body = msgpack.packb({"frames": [WATER_MOLECULE]}, use_bin_type=True)
    r = client.post("/predict", content=body, headers={"content-type": "application/msgpack"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert np.shape(r.json()["results"][0]["forces"]) == (3, 3)


def _assert_same(a: dict, b: dict, rtol=1e-9):
    assert a["energy"] == pytest.approx(b["energy"], rel=rtol)
    for k in ("forces", "virial"):
        x, y = np.array(a[k]), np.array(b[k])
        np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * np.abs(y).max())


@pytest.mark.parametrize("model", MODELS)
def test_results_do_not_depend_on_batch_partners(tiny_store, model):
    """The same frame alone, inside a multi-frame request, with a small chunk size, and under concurrent
    requests from threads (batched across requests by the server) gives the same numbers."""
    box, cluster = water_box(), water_cluster(3)
    settings = make_settings(tiny_store, batch_wait_ms=20)
    with TestClient(create_app(settings)) as client:
        (alone,) = predict(client, [box], model)
        (cl_alone,) = predict(client, [cluster], model)
        multi = predict(client, [cluster, box, WATER_MOLECULE, box], model)
        _assert_same(multi[1], alone)
        _assert_same(multi[3], alone)
        _assert_same(multi[0], cl_alone)

        results: dict[int, list] = {}

        def worker(k):
            frames = [box] if k % 2 == 0 else [cluster, WATER_MOLECULE]
            results[k] = [predict(client, frames, model) for _ in range(2)]

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert len(results) == 6
        for k, runs in results.items():
            for res in runs:
                _assert_same(res[0], alone if k % 2 == 0 else cl_alone)
    with TestClient(create_app(make_settings(tiny_store, chunk_atoms=50, max_batch_atoms=64))) as client:
        (chunked,) = predict(client, [box], model)
        _assert_same(chunked, alone)


def test_isolated_atom_has_zero_force(client):
    (res,) = predict(client, [{"species": ["O"], "positions": [[1.0, 2.0, 3.0]]}], SE)
    assert np.all(np.array(res["forces"]) == 0)
    assert np.isfinite(res["energy"])


def test_model_by_name_and_version_and_default(client):
    r = post(client, {"model": "water-se-tiny/1", "frames": [WATER_MOLECULE]})
    assert r.json()["model"] == {"name": SE, "version": "1"}
    r = post(client, {"frames": [WATER_MOLECULE]})  # default: no water-se here, so the first by name
    assert r.json()["model"] == {"name": LOCFRAME, "version": "1"}


@pytest.mark.parametrize("model", MODELS)
def test_repeated_requests_give_bit_identical_numbers(client, model):
    """Determinism: the same request again gives the very same bits (no run-to-run noise from threads or
    batching order); with other frames around it, the frame's numbers stay within 1e-9 relative (above)."""
    frames = [water_box(), water_cluster(3)]
    first = predict(client, frames, model, ["energy", "forces", "virial", "atomic_energies"])
    for _ in range(2):
        again = predict(client, frames, model, ["energy", "forces", "virial", "atomic_energies"])
        assert again == first
