"""Clients on the tiny model store (the lifespan runs: `with TestClient(app)`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.main import create_app

WATER = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "water" / "data_0"
SE, LOCFRAME = "water-se-tiny", "water-locframe-tiny"

WATER_MOLECULE = {"species": ["O", "H", "H"], "positions": [[0.0, 0.0, 0.0], [0.7572, 0.5865, 0.0], [-0.7572, 0.5865, 0.0]]}


def water_box() -> dict:
    """Frame 0 of the water data: 192 atoms in a cubic periodic box of 12.44 A (float64 lists)."""
    d = WATER / "set.000"
    pos = np.load(d / "coord.npy")[0].reshape(-1, 3).astype(np.float64)
    cell = np.load(d / "box.npy")[0].reshape(3, 3).astype(np.float64)
    type_map = (WATER / "type_map.raw").read_text().split()
    species = [type_map[t] for t in np.loadtxt(WATER / "type.raw", dtype=int)]
    return {"species": species, "positions": pos.tolist(), "cell": cell.tolist(), "pbc": [True, True, True]}


def water_cluster(n_molecules: int = 4) -> dict:
    """The n water molecules nearest to the centre of the box, unwrapped: an isolated cluster."""
    box = water_box()
    pos, cell = np.array(box["positions"]), np.array(box["cell"])
    species = box["species"]
    n_o = species.count("O")
    o = pos[:n_o]
    centre = o[np.argmin(np.linalg.norm(o - o.mean(0), axis=1))]
    d = o - centre
    d -= np.round(d @ np.linalg.inv(cell)) @ cell  # minimum image
    chosen = np.argsort(np.linalg.norm(d, axis=1))[:n_molecules]
    hs = pos[n_o:]
    out_s, out_p = [], []
    for k in chosen:
        ok = centre + d[k]
        out_s.append("O")
        out_p.append(ok)
        dh = hs - ok
        dh -= np.round(dh @ np.linalg.inv(cell)) @ cell
        for h in np.argsort(np.linalg.norm(dh, axis=1))[:2]:
            out_s.append("H")
            out_p.append(ok + dh[h])
    return {"species": out_s, "positions": np.array(out_p).tolist()}


def make_settings(store: Path, **kw) -> Settings:
    return Settings(model_store=store, device="cpu", intra_op_threads=1, **kw)


@pytest.fixture(scope="module")
def client(tiny_store):
    with TestClient(create_app(make_settings(tiny_store))) as c:
        yield c


def post(client, body: dict, **kw):
    return client.post("/predict", json=body, **kw)


def message(response) -> str:
    """All error messages of a response, joined."""
    detail = response.json()["detail"]
    return detail if isinstance(detail, str) else " | ".join(e["msg"] for e in detail)
