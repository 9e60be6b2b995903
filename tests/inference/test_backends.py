"""DeepPotModel.predict gives the same answers on the numba kernels and on the numpy reference (the physics
backend, DPSERVE_PHYSICS_BACKEND): energies, atomic energies, forces, virials and dropped neighbours, for
both descriptors, chunked and packed frames, periodic, small-cell and isolated systems."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.inference.model import DeepPotModel, Frame

pytest.importorskip("app.physics.kernels", reason="numba is not installed")

WATER = Path(__file__).resolve().parents[3] / "shared" / "data" / "water" / "data_0"
if not WATER.is_dir():
    WATER = Path("/work/shared/data/water/data_0")


def _water(frame=0):
    coord = np.load(WATER / "set.000" / "coord.npy")[frame].reshape(-1, 3)
    cell = np.load(WATER / "set.000" / "box.npy")[frame].reshape(3, 3)
    types = np.array((WATER / "type.raw").read_text().split(), dtype=np.int64)
    return coord, cell, types


def _frames():
    coord, cell, types = _water(0)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(types))  # elements interleaved: rows of one element are not contiguous
    small = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]])
    return [
        Frame(types, coord, cell, np.array([True] * 3)),
        Frame(types[order], coord[order], cell, np.array([True, False, True])),
        Frame(np.array([0, 1, 1]), small),  # isolated molecule
        Frame(np.array([0, 1, 1]), small, np.eye(3) * 3.2, np.array([True] * 3)),  # own images within rcut
        Frame(np.array([1]), np.array([[0.0, 0.0, 0.0]])),  # one atom, no neighbour
    ]


@pytest.mark.parametrize("name", ["water-se-tiny", "water-locframe-tiny"])
@pytest.mark.parametrize("chunk_atoms", [8192, 50])
def test_predict_is_the_same_on_both_backends(tiny_store, name, chunk_atoms):
    model = DeepPotModel.load(tiny_store / name / "1", device="cpu", intra_op_threads=1)
    out = {}
    for backend in ("numpy", "numba"):
        model.physics_backend = backend
        out[backend] = model.predict(_frames(), atomic_energies=True, chunk_atoms=chunk_atoms)
    for ref, new in zip(out["numpy"], out["numba"], strict=True):
        assert new["n_dropped"] == ref["n_dropped"]
        assert abs(new["energy"] - ref["energy"]) <= 1e-12 * max(abs(ref["energy"]), 1.0)
        for key in ("atomic_energies", "forces", "virial"):
            scale = max(np.abs(ref[key]).max(), 1e-300)
            assert np.abs(new[key] - ref[key]).max() <= 1e-12 * scale, key
