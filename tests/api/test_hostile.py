"""Hostile input is refused quickly, before it can exhaust time or memory: deeply nested and gigantic bodies,
a neighbour explosion (10^5 atoms in 1 nm^3), a 10^6-atom request. Each test bounds the time of the refusal
and checks that the server still serves afterwards."""

from __future__ import annotations

import time

import msgpack
import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.schemas import raw_array

from .conftest import SE, WATER_MOLECULE, make_settings, message, water_cluster

MSGPACK = {"content-type": "application/msgpack"}


def timed(fn, *a, **kw):
    t0 = time.perf_counter()
    r = fn(*a, **kw)
    return r, time.perf_counter() - t0


def still_serves(client):
    assert client.post("/predict", json={"model": SE, "frames": [WATER_MOLECULE]}).status_code == 200


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
def test_deeply_nested_body_is_a_400(client, encoding):
    depth = 100_000
    if encoding == "json":
        body, headers = b'{"frames": ' + b"[" * depth + b"]" * depth + b"}", {"content-type": "application/json"}
    else:
        body, headers = b"\x81\xa6frames" + b"\x91" * depth + b"\xc0", MSGPACK  # {"frames": [[[...nil...]]]}
    r, dt = timed(client.post, "/predict", content=body, headers=headers)
    assert r.status_code in (400, 422), r.text[:300]
    assert dt < 5
    still_serves(client)


def test_nested_frames_within_the_parser_limit_are_a_422(client):
    body = b'{"frames": ' + b"[" * 500 + b"]" * 500 + b"}"
    r = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422 and "frames[0]" in message(r)


def test_gigantic_body_is_refused_before_it_is_read(tiny_store):
    with TestClient(create_app(make_settings(tiny_store, max_body_bytes=1_000_000))) as client:
        big = b'{"frames": [' + b'{"species": ["O"], "positions": [[0, 0, 0]]},' * 200_000 + b"]}"  # 9 MB
        r, dt = timed(client.post, "/predict", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and "max_body_bytes = 1000000" in message(r) and dt < 5

        def chunks():  # no Content-Length: refused as soon as the stream passes the limit
            for _ in range(1000):
                yield b" " * 100_000

        r, dt = timed(client.post, "/predict", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and dt < 5
        still_serves(client)


@pytest.mark.parametrize("periodic", [True, False])
def test_neighbour_explosion_is_a_quick_422(client, periodic):
    """10^5 atoms in a 10 A cube (100 atoms/A^3, about 9e4 neighbours each within 6 A): refused from the
    density estimate, in O(N), before a neighbour list is built."""
    n = 100_000
    pos = np.random.default_rng(1).uniform(0, 10, (n, 3))
    frame = {"species": ["O", "H", "H"] * (n // 3) + ["O"], "positions": raw_array(pos)}
    if periodic:
        frame["cell"] = raw_array(np.eye(3) * 10.0)
    body = msgpack.packb({"model": SE, "frames": [frame]}, use_bin_type=True)
    r, dt = timed(client.post, "/predict", content=body, headers=MSGPACK)
    assert r.status_code == 422 and "too dense" in message(r) and "max_neighbours_per_atom" in message(r)
    assert dt < 10
    still_serves(client)


def test_million_atom_request_is_a_quick_413(client):
    n = 1_000_000
    frame = {"species": ["O", "H", "H", "H"] * (n // 4),
             "positions": raw_array(np.random.default_rng(2).uniform(0, 500, (n, 3))), "cell": raw_array(np.eye(3) * 500)}
    body = msgpack.packb({"model": SE, "frames": [frame]}, use_bin_type=True)  # 27 MB
    r, dt = timed(client.post, "/predict", content=body, headers=MSGPACK)
    assert r.status_code == 413 and "1000000 atoms exceed max_atoms_per_frame = 200000" in message(r)
    assert dt < 10
    frames = [{"species": ["O"] * 150_000, "positions": raw_array(np.zeros((150_000, 3)))}] * 2
    body = msgpack.packb({"model": SE, "frames": frames}, use_bin_type=True)
    r = client.post("/predict", content=body, headers=MSGPACK)
    assert r.status_code == 413 and "max_atoms_per_request" in message(r)
    still_serves(client)


def test_the_neighbour_limit_holds_for_small_isolated_frames(tiny_store):
    """A small isolated frame skips the density estimate only when it cannot exceed the limit (n atoms have
    at most n neighbours each, the atom counted): one atom more than the limit is counted and refused."""
    with TestClient(create_app(make_settings(tiny_store, max_neighbours_per_atom=6))) as c:
        fits, over = water_cluster(2), water_cluster(3)  # 6 and 9 atoms, all within each other's cutoff
        assert c.post("/predict", json={"model": SE, "frames": [fits]}).status_code == 200
        r = c.post("/predict", json={"model": SE, "frames": [fits, over]})
        assert r.status_code == 422 and "frames[1].positions" in message(r) and "too dense" in message(r)


def test_a_small_dense_periodic_cell_is_refused_by_its_exact_count(tiny_store, monkeypatch):
    """A small periodic cell is counted exactly, in one pass (no estimate): 500 atoms in a 13 A cube, about
    twice liquid water's density (~200 neighbours each within 6 A), against max_neighbours_per_atom = 100."""
    pos = np.random.default_rng(3).uniform(0, 13.0, (500, 3))
    species = (["O", "H", "H"] * 167)[:500]
    body = {"model": SE, "frames": [{"species": species, "positions": pos.tolist(), "cell": (np.eye(3) * 13.0).tolist()}]}
    from app.inference import validation

    monkeypatch.setattr(validation, "estimate_neighbours", lambda *a: pytest.fail("the estimate was used"))
    with TestClient(create_app(make_settings(tiny_store, max_neighbours_per_atom=100))) as c:
        r = c.post("/predict", json=body)
        assert r.status_code == 422 and "too dense" in message(r) and "max_neighbours_per_atom = 100" in message(r)
        still_serves(c)
