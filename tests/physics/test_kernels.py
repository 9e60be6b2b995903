"""The numba kernels (app.physics.kernels) against the numpy reference: slots, environments, dropped
neighbours, dE/drij, forces and virials to 1e-12 relative, on every structure of the physics tests and on
loc_frame's awkward cases; the pair list against vesin's full list; the backend switch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.physics.descriptors import LocFrame, SeA
from app.physics.forces import accumulate_forces_virial
from app.physics.neighbors import neighbor_list

from .helpers import (
    STRUCTURES,
    WATER_AXIS_RULE,
    TestEnergy,
    small_descriptors,
    structure,
    water_frame,
    water_loc_frame,
    water_se_a,
)

kernels = pytest.importorskip("app.physics.kernels", reason="numba is not installed")

RTOL = 1e-12
KINDS = ["se_e2_a", "loc_frame"]


def _close(actual, expected, what):
    scale = max(np.abs(expected).max(initial=0.0), 1e-300)
    err = np.abs(actual - expected).max(initial=0.0)
    assert err <= RTOL * scale, f"{what}: max error {err:.3e} vs scale {scale:.3e}"


def _compare(desc, positions, cell, pbc, types, chunk_size=None, seed=0):
    """Run both paths; assert they agree; return the fast chunks (for further checks)."""
    nl = neighbor_list(positions, cell, pbc, desc.rcut)
    pairs = kernels.pair_list(positions, cell, pbc, desc.rcut)
    assert len(pairs) == len(nl)
    energy = TestEnergy(desc.sel, seed=seed)
    f_ref, v_ref = np.zeros_like(positions), np.zeros((3, 3))
    f_new, v_new = np.zeros_like(positions), np.zeros((3, 3))
    fast = list(kernels.chunks(desc, pairs, types, chunk_size))
    for ref, new in zip(desc.chunks(nl, types, chunk_size), fast, strict=True):
        assert (new.start, new.stop) == (ref.start, ref.stop)
        # the same neighbour in every slot, at the same vector (bit for bit: the sort order is the same)
        np.testing.assert_array_equal(new.pair >= 0, ref.slots.mask)
        np.testing.assert_array_equal(new.slots.rij, ref.slots.rij)
        j_ref = np.where(ref.slots.mask, np.append(nl.j, -1)[ref.slots.pair], -1)
        j_new = np.where(new.pair >= 0, np.append(pairs.j, -1)[new.pair], -1)
        np.testing.assert_array_equal(j_new, j_ref)
        np.testing.assert_array_equal(new.n_dropped, ref.slots.n_dropped)
        if isinstance(desc, LocFrame):
            np.testing.assert_array_equal(new.axis, ref.axis)
            _close(new.x, desc.features(ref.env), "features")
        _close(new.env, ref.env, "env")
        # the energy's gradient, through the reference env (as the network would see it)
        _, g_env = energy(ref.env)
        d_ref = desc.vjp(ref, g_env)
        accumulate_forces_virial(ref.slots, ref.start, nl.j, d_ref, f_ref, v_ref)
        g = desc.features(g_env) if isinstance(desc, LocFrame) else g_env
        d_new = np.zeros((*new.pair.shape, 3))
        kernels.vjp_assemble(new, g, f_new, v_new, d_new)
        _close(d_new, d_ref, "dE/drij")
    _close(f_new, f_ref, "forces")
    _close(v_new, v_ref, "virial")
    return fast


def _small(kind, name, seed=1):
    desc = small_descriptors()[KINDS.index(kind)]
    positions, cell, pbc, types = structure(name, seed)
    return desc, positions, cell, pbc, types


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(STRUCTURES))
@pytest.mark.parametrize("seed", [1, 2])
def test_kernels_equal_reference_on_small_structures(name, kind, seed):
    desc, positions, cell, pbc, types = _small(kind, name, seed)
    _compare(desc, positions, cell, pbc, types, seed=seed)


@pytest.mark.parametrize("kind", KINDS)
def test_kernels_equal_reference_on_water_box_in_chunks(kind):
    positions, cell, types = water_frame(0)
    desc = water_se_a() if kind == "se_e2_a" else water_loc_frame()
    chunks = _compare(desc, positions, cell, np.ones(3, bool), types, chunk_size=50)
    assert len(chunks) == 4


@pytest.mark.parametrize("kind", KINDS)
def test_kernels_in_parallel_equal_reference(kind, monkeypatch):
    # threads on every call (the default runs fewer than 1024 centre atoms on the calling thread alone)
    monkeypatch.setattr(kernels, "_PARALLEL_MIN", 1)
    for name in STRUCTURES:
        _compare(*_small(kind, name))
    positions, cell, types = water_frame(0)
    n = 2
    positions = (positions[None] + (np.indices((n, n, n)).reshape(3, -1).T @ cell)[:, None]).reshape(-1, 3)
    desc = water_se_a() if kind == "se_e2_a" else water_loc_frame()
    _compare(desc, positions, cell * n, np.ones(3, bool), np.tile(types, n**3), chunk_size=1000)


def test_small_cell_sees_own_images_in_the_same_order():
    # every atom sees several images of itself at exactly equal distances (+S, -S): ordered by vector
    desc, positions, cell, pbc, types = _small("loc_frame", "small_cell")
    nl = neighbor_list(positions, cell, pbc, desc.rcut)
    assert np.any(nl.i == nl.j)
    for kind in KINDS:
        _compare(small_descriptors()[KINDS.index(kind)], positions, cell, pbc, types)


def test_exact_distance_ties_in_a_crystal():
    # a simple cubic crystal in a cell barely wider than the cutoff: shells of exact ties, and two images
    # of one atom at the same distance
    grid = np.stack(np.meshgrid(*[np.arange(4)] * 3, indexing="ij"), -1).reshape(-1, 3) * 2.0
    types = grid.sum(axis=1).astype(int) // 2 % 2
    for desc in (SeA(4.5, 1.0, [40, 40]), SeA(4.5, 1.0, [7, 9]), LocFrame(4.5, [6, 6], [30, 30], WATER_AXIS_RULE)):
        _compare(desc, grid, np.eye(3) * 8.0, [True] * 3, types)


def test_pair_list_is_vesins_full_list_grouped_by_centre():
    for name in STRUCTURES:
        positions, cell, pbc, _ = structure(name)
        nl = neighbor_list(positions, cell, pbc, 4.0)
        pairs = kernels.pair_list(positions, cell, pbc, 4.0)
        assert pairs.natoms == len(positions)
        counts = np.bincount(nl.i, minlength=len(positions))
        np.testing.assert_array_equal(np.diff(pairs.start), counts)
        for a in range(len(positions)):
            ref = nl.D[nl.i == a]
            new = pairs.D[pairs.start[a] : pairs.start[a + 1]]
            key = lambda D: np.lexsort(D.T[::-1])  # noqa: E731
            np.testing.assert_array_equal(new[key(new)], ref[key(ref)])


def test_small_isolated_frames_take_all_pairs_exactly_as_vesin():
    """Isolated frames up to _DENSE_PAIRS_MAX atoms skip vesin: same pairs, same vectors bit for bit."""
    rng = np.random.default_rng(5)
    for n in (2, 7, kernels._DENSE_PAIRS_MAX):
        positions = rng.uniform(-4, 4, size=(n, 3))
        _same_pairs(kernels.pair_list(positions, None, None, 3.0), neighbor_list(positions, None, None, 3.0), n)


def test_packed_frames_take_all_pairs_within_each_frame_exactly_as_vesin():
    """block_pair_list of molecules packed more than a cutoff apart (app.inference.packing) = vesin's list of
    the packed frame: same pairs, same vectors bit for bit; none across frames; bad bounds refused."""
    rng = np.random.default_rng(11)
    sizes = [1, 7, 3, 20, 2]
    parts, shift = [], 0.0
    for n in sizes:
        parts.append(rng.uniform(-2, 2, size=(n, 3)) + [shift, 0.3 * shift, 0.0])
        shift += 4.0 + 3.5 + 0.5  # extent + cutoff + margin
    positions = np.concatenate(parts)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    pairs = kernels.block_pair_list(positions, bounds, 3.5)
    _same_pairs(pairs, neighbor_list(positions, None, None, 3.5), len(positions))
    owner = np.repeat(np.arange(len(sizes)), sizes)
    centres = np.repeat(np.arange(len(positions)), np.diff(pairs.start))
    assert np.all(owner[pairs.j] == owner[centres])
    with pytest.raises(ValueError, match="bounds"):
        kernels.block_pair_list(positions, bounds[:-1], 3.5)


# ---------------------------------------------------------------------------------------------------------
# loc_frame's awkward cases and the other corners

LOC = LocFrame(6.0, [2, 4], [2, 4], WATER_AXIS_RULE)
COLLINEAR = np.array([[0, 0, 0], [0.95, 0, 0], [-1.0, 0, 0], [0.3, 1.5, 0.2], [2.5, 0.6, -1.1]], float)


@pytest.mark.parametrize(
    "case",
    [
        ("collinear axis atoms", COLLINEAR, np.array([0, 1, 1, 1, 0])),
        ("linear molecule", np.outer([0.0, 0.96, -1.01], [0.48, -0.6, 0.64]), np.array([0, 1, 1])),
        ("linear along x", np.array([[0, 0, 0], [0.96, 0, 0], [-0.96, 0, 0]], float), np.array([0, 1, 1])),
        ("one neighbour", np.array([[0.1, -0.2, 0.3], [0.8, 0.5, -0.4]]), np.array([0, 1])),
        ("no neighbour", np.array([[0.0, 0.0, 0.0], [7.0, 0.0, 0.0]]), np.array([0, 1])),
        ("missing rule element", np.array([[0, 0, 0], [0.97, 0.1, 0.0], [-0.4, 2.6, 0.3], [0.5, -0.7, 2.8]]),
         np.array([0, 1, 0, 0])),
        ("single atom", np.array([[1.0, 2.0, 3.0]]), np.array([1])),
    ],
    ids=lambda c: c[0],
)
def test_loc_frame_awkward_cases(case):
    _, positions, types = case
    chunks = _compare(LOC, positions, None, None, types)
    assert np.isfinite(chunks[0].x).all()


def test_loc_frame_awkward_cases_are_the_ones_meant():
    (ch,) = kernels.chunks(LOC, kernels.pair_list(COLLINEAR, None, None, 6.0), np.array([0, 1, 1, 1, 0]))
    h0 = LOC.sel[0]
    np.testing.assert_array_equal(ch.axis[0], [h0, h0 + 2])  # the third H builds e_y
    (ch,) = kernels.chunks(LOC, kernels.pair_list(np.array([[0, 0, 0], [7.0, 0, 0]]), None, None, 6.0), np.array([0, 1]))
    np.testing.assert_array_equal(ch.axis, -1)
    np.testing.assert_array_equal(ch.x, 0.0)


@pytest.mark.parametrize("desc", [LocFrame(6.0, [1, 2], [1, 1], WATER_AXIS_RULE), SeA(6.0, 0.5, [2, 3])])
def test_more_neighbours_than_sel(desc):
    rng = np.random.default_rng(0)
    dirs = rng.normal(size=(6, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    positions = np.vstack([[0, 0, 0], dirs * np.array([1.3, 1.0, 1.5, 1.1, 1.4, 1.2])[:, None]])
    types = np.array([0, 1, 1, 1, 1, 1, 1])
    (ch,) = _compare(desc, positions, None, None, types)
    assert ch.n_dropped[0] == 3 and (ch.n_dropped[1:] == 2).all()


@pytest.mark.parametrize("desc", [LOC, SeA(6.0, 0.5, [2, 3])])
def test_more_rule_elements_than_sel_and_dense_random_cluster(desc):
    # many neighbours per element, so that rules, collinearity checks and dropping all see full rows
    rng = np.random.default_rng(3)
    positions = rng.uniform(0, 5.0, size=(40, 3))
    types = rng.integers(0, 2, size=40)
    _compare(desc, positions, None, None, types, chunk_size=7)


def test_forces_accumulate_into_given_arrays():
    desc, positions, cell, pbc, types = _small("se_e2_a", "triclinic")
    (ch,) = kernels.chunks(desc, kernels.pair_list(positions, cell, pbc, desc.rcut), types)
    g = np.random.default_rng(1).standard_normal(ch.x.shape)
    f1, v1 = np.zeros_like(positions), np.zeros((3, 3))
    kernels.vjp_assemble(ch, g, f1, v1)
    f2, v2 = np.ones_like(positions), np.ones((3, 3))
    kernels.vjp_assemble(ch, g, f2, v2)
    _close(f2 - 1.0, f1, "forces added")
    _close(v2 - 1.0, v1, "virial added")
    assert abs(f1.sum(axis=0)).max() < 1e-12 * abs(f1).max()  # Newton's third law
    with pytest.raises(ValueError, match="g has shape"):
        kernels.vjp_assemble(ch, g[:-1], f1, v1)


def test_bad_element_index_raises_instead_of_crashing():
    positions = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0]])
    pairs = kernels.pair_list(positions, None, None, 4.0)
    for types in (np.array([0, 2]), np.array([-1, 0])):
        with pytest.raises(IndexError, match="element indices"):
            list(kernels.chunks(SeA(4.0, 0.5, [2, 2]), pairs, types))
    with pytest.raises(ValueError, match="pair list is for 2 atoms"):
        kernels.compute(SeA(4.0, 0.5, [2, 2]), pairs, np.array([0, 1, 1]))


def test_empty_frame_and_no_pairs():
    pairs = kernels.pair_list(np.zeros((0, 3)), None, None, 3.0)
    assert len(pairs) == 0 and pairs.natoms == 0
    assert list(kernels.chunks(SeA(3.0, 0.5, [2]), pairs, np.zeros(0, np.int64))) == []


def _same_pairs(pairs, nl, n):
    np.testing.assert_array_equal(np.diff(pairs.start), np.bincount(nl.i, minlength=n))
    for a in range(n):
        ref = nl.D[nl.i == a]
        new = pairs.D[pairs.start[a] : pairs.start[a + 1]]
        key = lambda D: np.lexsort(D.T[::-1])  # noqa: E731
        np.testing.assert_array_equal(new[key(new)], ref[key(ref)])
        np.testing.assert_array_equal(np.sort(pairs.j[pairs.start[a] : pairs.start[a + 1]]), np.sort(nl.j[nl.i == a]))


def test_small_periodic_cells_take_all_pairs_exactly_as_vesin(monkeypatch):
    """Periodic cells of up to _SMALL_CELL_MAX atoms whose planes are more than two cutoffs apart skip
    vesin's cell list: the same pairs and vectors bit for bit, also in skewed cells and with atoms far
    outside the cell. Checked with vesin's calculator removed from the path."""
    rng = np.random.default_rng(11)
    cutoff = 2.8
    cases = []
    for skew in (0.0, 0.3, 0.6):
        cell = np.array([[7.0, 0, 0], [skew * 7.0, 7.5, 0], [0.4 * skew * 7, -skew * 3, 8.0]])
        cases.append((cell, 40))
        cases.append((cell, kernels._SMALL_CELL_MAX))
    expected = {}
    for k, (cell, n) in enumerate(cases):
        positions = rng.uniform(-1.0, 2.0, size=(n, 3)) @ cell  # some atoms outside the cell
        assert kernels._small_cell(cell, np.ones(3, bool), cutoff)
        expected[k] = (positions, neighbor_list(positions, cell, [True] * 3, cutoff))
    monkeypatch.setattr(kernels, "_calculator", lambda cutoff: pytest.fail("vesin was called"))
    for k, (cell, n) in enumerate(cases):
        positions, nl = expected[k]
        _same_pairs(kernels.pair_list(positions, cell, [True] * 3, cutoff), nl, n)


def test_cells_too_thin_or_open_or_large_go_to_vesin(monkeypatch):
    cube = np.eye(3) * 7.0
    assert not kernels._small_cell(cube, np.ones(3, bool), 3.5)  # planes exactly two cutoffs apart
    assert not kernels._small_cell(cube, np.array([True, True, False]), 3.0)
    thin = np.diag([7.0, 7.0, 5.9])
    assert not kernels._small_cell(thin, np.ones(3, bool), 3.0)
    rng = np.random.default_rng(12)
    cases = [(cell, n, rng.uniform(0, 1, size=(n, 3)) @ cell) for cell, n in ((thin, 50), (cube, kernels._SMALL_CELL_MAX + 1))]
    expected = [neighbor_list(positions, cell, [True] * 3, 3.0) for cell, _, positions in cases]
    monkeypatch.setattr(kernels, "_small_cell_pairs", lambda *a: pytest.fail("small-cell loop was called"))
    for (cell, n, positions), nl in zip(cases, expected, strict=True):
        _same_pairs(kernels.pair_list(positions, cell, [True] * 3, 3.0), nl, n)


def test_warmup_compiles_every_kernel():
    """In a fresh process, warmup() leaves no kernel to compile on a request (the validation scan runs on the
    event loop: compiling it there would stall every client for a second)."""
    import subprocess
    import sys

    entry_points = ["_group_pairs", "_dense_pairs", "_block_pairs", "_small_cell_pairs", "closest_dense", "small_cell_scan",
                    "_se_a_env", "_se_a_vjp", "_loc_frame_env", "_loc_frame_vjp", "_reduce"]
    # (helpers called only from other kernels compile into them; loaded from numba's cache they show none)
    code = ("from app.physics import kernels\nkernels.warmup()\n"
            f"print([n for n in {entry_points!r} if not getattr(kernels, n).signatures])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(Path(__file__).resolve().parents[2]))
    assert out.stdout.strip() == "[]", out.stdout
