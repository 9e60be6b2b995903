"""Fixtures of the client tests: the real app in-process (TestClient, lifespan runs) and, for what needs a
socket (i-PI, the examples), the real app under uvicorn on a loopback port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from ase import Atoms

ROOT = Path(__file__).resolve().parents[2]
WATER = ROOT.parent / "shared" / "data" / "water" / "data_0"
SE, LOCFRAME = "water-se-tiny", "water-locframe-tiny"


def water_box() -> Atoms:
    """Frame 0 of the water data: 64 H2O, 192 atoms, cubic periodic box of 12.44 A."""
    type_map = (WATER / "type_map.raw").read_text().split()
    types = np.loadtxt(WATER / "type.raw", dtype=int)
    pos = np.load(WATER / "set.000" / "coord.npy")[0].reshape(-1, 3)
    cell = np.load(WATER / "set.000" / "box.npy")[0].reshape(3, 3)
    return Atoms([type_map[t] for t in types], positions=pos, cell=cell, pbc=True)


def sheared_box() -> Atoms:
    """The water box under a homogeneous strain with shear, so that the cell is triclinic and not
    symmetric (lattice vectors as rows, lower triangular, as i-PI's upper-triangular h transposed): a
    transposed cell would be a different structure and give a different energy."""
    a = water_box()
    strain = np.array([[1.01, 0.0, 0.0], [0.04, 0.99, 0.0], [-0.03, 0.05, 1.0]])  # rows: new = old @ strain
    a.set_cell(a.cell.array @ strain, scale_atoms=True)
    return a


def water_molecule() -> Atoms:
    return Atoms("OH2", positions=[[0.0, 0.0, 0.0], [0.7572, 0.5865, 0.0], [-0.7572, 0.5865, 0.0]])


def water_cluster(n: int = 3) -> Atoms:
    """n intact molecules from the box, unwrapped, as an isolated cluster."""
    box = water_box()
    o = [i for i, s in enumerate(box.get_chemical_symbols()) if s == "O"][:n]
    h = [i for i, s in enumerate(box.get_chemical_symbols()) if s == "H"]
    idx, pos = [], []
    for i in o:
        d = box.get_distances(i, h, mic=True, vector=True)
        near = np.argsort(np.linalg.norm(d, axis=1))[:2]
        idx += [i, h[near[0]], h[near[1]]]
        pos += [box.positions[i], box.positions[i] + d[near[0]], box.positions[i] + d[near[1]]]
    # place the molecules near each other: shift each to within 3.5 A of the first
    pos = np.array(pos)
    for m in range(1, n):
        pos[3 * m:3 * m + 3] += pos[0] - pos[3 * m] + np.array([2.9 * m, 0.4 * m, -0.3 * m])
    return Atoms([box.get_chemical_symbols()[i] for i in idx], positions=pos)


@pytest.fixture(scope="module")
def app_client(tiny_store):
    """FastAPI's TestClient (an httpx.Client) on the real app and the tiny store; lifespan runs."""
    from fastapi.testclient import TestClient

    from app.core.config import Settings
    from app.main import create_app

    settings = Settings(model_store=tiny_store, device="cpu", intra_op_threads=1, default_model=SE)
    with TestClient(create_app(settings)) as tc:
        yield tc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def live_server(tiny_store, tmp_path_factory):
    """URL of the real service under uvicorn on 127.0.0.1 (a subprocess; always terminated)."""
    port = _free_port()
    env = {**os.environ, "DPSERVE_MODEL_STORE": str(tiny_store), "DPSERVE_DEVICE": "cpu",
           "DPSERVE_INTRA_OP_THREADS": "1", "DPSERVE_DEFAULT_MODEL": SE}
    log = tmp_path_factory.mktemp("uvicorn") / "uvicorn.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port),
             "--log-level", "warning"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"uvicorn exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(url + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn not ready after 60 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
