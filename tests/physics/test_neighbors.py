"""Neighbour lists against ASE's reference implementation, and their edge cases."""

from __future__ import annotations

import numpy as np
import pytest
from ase.neighborlist import primitive_neighbor_list

from app.physics.neighbors import neighbor_list

from .helpers import STRUCTURES, random_rotation, structure, water_frame


def _canonical(i, j, S, D, d):
    """Pairs sorted by (i, j, S): (keys (P, 5) int, D (P, 3), d (P,))."""
    keys = np.column_stack([i, j, S]).astype(np.int64)
    order = np.lexsort(keys.T[::-1])
    return keys[order], np.asarray(D)[order], np.asarray(d)[order]


def _compare_with_ase(positions, cell, pbc, cutoff):
    nl = neighbor_list(positions, cell, pbc, cutoff)
    ase_cell = np.zeros((3, 3)) if cell is None else cell
    ase_pbc = np.zeros(3, bool) if cell is None else np.asarray(pbc)
    ref = primitive_neighbor_list("ijSDd", ase_pbc, ase_cell, positions, cutoff)
    got = _canonical(nl.i, nl.j, nl.S, nl.D, nl.d)
    want = _canonical(*ref)
    assert len(got[0]) == len(want[0]), f"{len(got[0])} pairs, ASE finds {len(want[0])}"
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], atol=1e-10)
    np.testing.assert_allclose(got[2], want[2], atol=1e-10)
    # and the vectors are what the convention says: D = r_j + S @ cell - r_i
    shift = 0 if cell is None else nl.S @ cell
    np.testing.assert_allclose(nl.D, positions[nl.j] + shift - positions[nl.i], atol=1e-10)
    np.testing.assert_allclose(nl.d, np.linalg.norm(nl.D, axis=1), atol=1e-12)
    return nl


@pytest.mark.parametrize("cutoff", [1.5, 3.0, 4.5, 7.0])
@pytest.mark.parametrize("name", list(STRUCTURES))
@pytest.mark.parametrize("rotation", [None, 11, 12])
def test_matches_ase_neighbor_list(name, cutoff, rotation):
    positions, cell, pbc, _ = structure(name)
    if rotation is not None:
        R = random_rotation(rotation)
        positions = positions @ R
        cell = None if cell is None else cell @ R
    nl = _compare_with_ase(positions, cell, pbc, cutoff)
    assert len(nl) > 0 or cutoff < 2.0


def test_matches_ase_on_water_box():
    positions, cell, _ = water_frame(0)
    _compare_with_ase(positions, cell, [True, True, True], 6.0)


def test_small_cell_sees_own_images():
    # one atom in a cell smaller than the cutoff: its only neighbours are its own periodic images
    cell = np.array([[2.0, 0.0, 0.0], [0.3, 2.1, 0.0], [0.2, -0.1, 2.2]])
    positions = np.array([[0.3, 0.4, 0.5]])
    nl = _compare_with_ase(positions, cell, [True, True, True], 4.5)
    assert (nl.j == 0).all() and (nl.S != 0).any(axis=1).all()
    # images come in +S / -S pairs at the same distance
    assert len(nl) % 2 == 0
    keys = {tuple(s) for s in nl.S}
    assert all(tuple(-s) in keys for s in nl.S)


def test_mixed_pbc_with_zero_cell_vector_along_open_direction():
    positions, cell, pbc, _ = structure("mixed_pbc")
    cell = cell.copy()
    cell[1] = 0.0  # allowed by ASE for a non-periodic direction
    nl = _compare_with_ase(positions, cell, pbc, 4.0)
    assert (nl.S[:, 1] == 0).all()


def test_atoms_on_cell_corners_see_each_other():
    cell = np.diag([10.0, 11.0, 12.0])
    positions = np.array([[0.0, 0.0, 0.0], [9.999, 10.999, 11.999], [10.0, 0.0, 12.0]])
    nl = _compare_with_ase(positions, cell, [True, True, True], 1.0)
    pairs = {(int(a), int(b)) for a, b in zip(nl.i, nl.j, strict=True)}
    assert {(0, 1), (1, 0), (0, 2), (2, 0), (1, 2), (2, 1)} <= pairs


def test_pair_just_inside_cutoff_is_listed_and_just_outside_is_not():
    rc = 5.0
    for d, expected in ((rc - 1e-6, 2), (rc + 1e-6, 0)):
        positions = np.array([[0.0, 0.0, 0.0], [d, 0.0, 0.0]])
        assert len(neighbor_list(positions, None, None, rc)) == expected
        cell = np.eye(3) * 20.0
        assert len(neighbor_list(positions + 1.0, cell, [True] * 3, rc)) == expected


def test_list_is_full_and_sorted_by_centre():
    positions, cell, pbc, _ = structure("triclinic")
    nl = neighbor_list(positions, cell, pbc, 4.0)
    assert (np.diff(nl.i) >= 0).all()
    forward = {(a, b, *s) for a, b, s in zip(nl.i, nl.j, nl.S.tolist(), strict=True)}
    backward = {(b, a, *(-np.array(s))) for a, b, s in zip(nl.i, nl.j, nl.S.tolist(), strict=True)}
    assert forward == backward


def test_isolated_system_and_empty_system():
    positions, _, _, _ = structure("isolated")
    nl_none = neighbor_list(positions, None, None, 3.0)
    nl_open = neighbor_list(positions, np.eye(3) * 2.0, [False] * 3, 3.0)  # a cell with no pbc is ignored
    np.testing.assert_array_equal(nl_none.S, 0)
    assert len(nl_none) == len(nl_open) > 0
    assert len(neighbor_list(np.zeros((0, 3)), None, None, 3.0)) == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"positions": np.zeros((3, 2))}, "positions must have shape"),
        ({"positions": np.full((2, 3), np.nan)}, "finite"),
        ({"cutoff": -1.0}, "cutoff"),
        ({"cell": np.eye(2)}, "cell must have shape"),
        ({"cell": np.zeros((3, 3))}, "singular"),
        ({"pbc": [True, False]}, "three booleans"),
        (
            {"cell": np.array([[5.0, 0, 0], [0, 5, 0], [10, 0, 0]]), "pbc": [True, False, True]},
            "periodic lattice",
        ),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    args = {
        "positions": np.zeros((2, 3)) + [[0, 0, 0], [1, 0, 0]],
        "cell": np.eye(3) * 5,
        "pbc": None,
        "cutoff": 2.0,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        neighbor_list(args["positions"], args["cell"], args["pbc"], args["cutoff"])
