"""The O(N) guards that run before a neighbour list on untrusted input: the density estimate and the
closest-pair search."""

from __future__ import annotations

import numpy as np
import pytest

from app.physics.neighbors import closest_pair, estimate_neighbours, neighbor_list


def _true_mean(positions, cell, pbc, cutoff):
    return len(neighbor_list(positions, cell, pbc, cutoff)) / len(positions)


def _water_like(n_side: int, spacing: float = 3.1, seed: int = 0):
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n_side)] * 3, indexing="ij"), -1).reshape(-1, 3) * spacing
    return grid + rng.normal(scale=0.3, size=grid.shape), np.eye(3) * n_side * spacing


@pytest.mark.parametrize("pbc", [(True, True, True), (True, True, False), (False, False, False)])
def test_estimate_is_close_for_a_uniform_liquid(pbc):
    pos, cell = _water_like(8)
    est = estimate_neighbours(pos, cell, pbc, 6.0)
    true = _true_mean(pos, cell, pbc, 6.0)
    assert 0.7 * true <= est <= 2.0 * true + 2


def test_estimate_counts_periodic_images_of_a_small_cell():
    cell = np.eye(3) * 2.0  # one atom, 8 A^3: about 113 images within 6 A
    est = estimate_neighbours(np.zeros((1, 3)), cell, None, 6.0)
    assert est == pytest.approx(4 / 3 * np.pi * 6**3 / 8, rel=1e-9)
    assert est > 0.9 * _true_mean(np.zeros((1, 3)), cell, None, 6.0)


def test_estimate_sees_a_pile_of_atoms():
    pos = np.random.default_rng(1).random((2000, 3)) * 0.5  # 2000 atoms within 0.9 A of each other
    assert estimate_neighbours(pos, None, None, 6.0) >= 1000


def test_estimate_of_a_triclinic_cell():
    cell = np.array([[5.0, 0, 0], [4.0, 3.0, 0], [1.0, 1.0, 6.0]])
    pos = np.random.default_rng(2).random((50, 3)) @ cell
    assert estimate_neighbours(pos, cell, None, 6.0) == pytest.approx(_true_mean(pos, cell, None, 6.0), rel=0.2)


def test_estimate_of_sparse_far_apart_atoms_is_small_and_fast():
    pos = np.array([[0.0, 0, 0], [1e5, -1e5, 1e5], [-1e5, 0, 3]])
    assert estimate_neighbours(pos, None, None, 6.0) == 1.0  # each atom alone in its window (itself)


def test_closest_pair_finds_atoms_on_top_of_each_other():
    pos = np.array([[0.0, 0, 0], [3.0, 0, 0], [3.0, 0.05, 0]])
    i, j, d = closest_pair(pos, None, None, 0.1)
    assert {i, j} == {1, 2} and d == pytest.approx(0.05)
    assert closest_pair(pos[:2], None, None, 0.1) is None


def test_closest_pair_finds_an_atom_and_its_own_image():
    i, j, d = closest_pair(np.zeros((1, 3)), np.diag([0.05, 10, 10]), None, 0.1)
    assert i == j == 0 and d == pytest.approx(0.05)


def test_closest_pair_across_a_periodic_boundary():
    pos = np.array([[0.01, 5, 5], [9.98, 5, 5]])
    i, j, d = closest_pair(pos, np.eye(3) * 10, None, 0.1)
    assert d == pytest.approx(0.03)
    assert closest_pair(pos, np.eye(3) * 10, [False, True, True], 0.1) is None


def test_closest_pair_of_small_molecules_is_the_same_compiled_or_numpy(monkeypatch):
    """Isolated frames up to 256 atoms take a compiled loop (app.physics.kernels.closest_dense) when numba is
    there: the same pair, ties included, and the same distance as the numpy distance matrix."""
    pytest.importorskip("app.physics.kernels")
    from app.physics import neighbors

    rng = np.random.default_rng(0)
    cases = []
    for n in (1, 2, 3, 7, 50, 256):
        for trial in range(10):
            p = rng.standard_normal((n, 3)) * 2
            if trial % 3 == 0 and n > 3:
                p[3] = p[1]  # coincident atoms
            cases.append(p)
    cases.append(np.array([[0.0, 0, 0], [1.0, 0, 0], [2.0, 0, 0]]))  # a tie: (0, 1) and (1, 2)
    compiled = [neighbors.closest_pair(p, within=1e9) for p in cases]
    assert compiled[-1] == (0, 1, 1.0)
    monkeypatch.setattr(neighbors, "_closest_dense", lambda: None)
    for p, got in zip(cases, compiled, strict=True):
        ref = neighbors.closest_pair(p, within=1e9)
        assert (got is None) == (ref is None) == (len(p) < 2)
        if ref is not None:
            assert got[:2] == ref[:2] and abs(got[2] - ref[2]) < 1e-12
    assert neighbors.closest_pair(cases[-1], within=0.5) is None
