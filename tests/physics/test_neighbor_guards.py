"""The O(N) guards that run before a neighbour list on untrusted input: the density estimate and the
closest-pair search."""

from __future__ import annotations

import numpy as np
import pytest

from app.physics import neighbors
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


def _skewed_cells():
    for skew in (0.0, 0.4):
        yield np.array([[9.0, 0, 0], [skew * 9.0, 9.5, 0], [0.3 * skew * 9, -skew * 3, 10.0]])


def test_small_periodic_cells_count_neighbours_exactly():
    """A periodic cell of up to _SMALL_CELL_MAX atoms, planes more than two cutoffs apart: the estimate is
    the exact mean (self included), by minimum image."""
    rng = np.random.default_rng(4)
    for cell in _skewed_cells():
        for n in (2, 60, neighbors._SMALL_CELL_MAX):
            pos = rng.uniform(-0.5, 1.5, size=(n, 3)) @ cell
            assert neighbors._small_cell_scan(pos, cell, np.ones(3, bool), 4.0) is not None
            assert estimate_neighbours(pos, cell, None, 4.0) == pytest.approx(_true_mean(pos, cell, None, 4.0) + 1, rel=1e-12)


def test_small_periodic_cells_find_the_closest_pair_as_vesin(monkeypatch):
    rng = np.random.default_rng(6)
    cases = []
    for cell in _skewed_cells():
        for n in (2, 40, 300):
            pos = rng.uniform(-0.5, 1.5, size=(n, 3)) @ cell
            cases.append((pos, cell))
            close = pos.copy()
            close[1] = close[0] + cell[2] + [0.05, -0.02, 0.01]  # 0.055 A from atom 0's image
            cases.append((close, cell))
    within = 1.5
    fast = [neighbors.closest_pair(p, c, None, within) for p, c in cases]
    assert any(f is not None and f[:2] == (0, 1) and f[2] < 0.06 for f in fast)
    monkeypatch.setitem(neighbors._COMPILED, "small_cell_scan", None)  # vesin's path
    for (p, c), got in zip(cases, fast, strict=True):
        ref = neighbors.closest_pair(p, c, None, within)
        assert (got is None) == (ref is None)
        if ref is not None:
            assert sorted(got[:2]) == sorted(ref[:2]) and got[2] == pytest.approx(ref[2], abs=1e-12)


def test_small_cell_screen_is_the_estimate_and_the_closest_pair_in_one_pass():
    rng = np.random.default_rng(8)
    for cell in _skewed_cells():
        pos = rng.uniform(0, 1, size=(120, 3)) @ cell
        pos[7] = pos[3] - cell[0] + 0.04  # 0.069 A from atom 3's image
        est, pair = neighbors.small_cell_screen(pos, cell, None, 4.0, 0.1)
        assert est == pytest.approx(_true_mean(pos, cell, None, 4.0) + 1, rel=1e-12)
        assert pair[:2] == (3, 7) and pair[2] == pytest.approx(0.04 * np.sqrt(3), rel=1e-9)
        assert neighbors.small_cell_screen(pos, cell, None, 4.0, 0.06)[1] is None
    thin = np.diag([9.0, 9.0, 7.0])
    pos = rng.uniform(0, 1, size=(20, 3)) @ thin
    assert neighbors.small_cell_screen(pos, thin, None, 4.0, 0.5) is None  # planes 7 A apart: not two cutoffs
    assert neighbors.small_cell_screen(pos, None, None, 4.0, 0.5) is None  # isolated
