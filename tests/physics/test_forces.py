"""Forces and virial by the chain rule equal finite differences of the energy, for both descriptors.

The energy is the test energy of helpers.py (a fixed random smooth function of the environment array);
forces come from the descriptor's VJP and :func:`accumulate_forces_virial`. Forces are compared with
central differences of E in the positions, the virial with -dE/d eps where positions and cell are both
mapped to x (I + eps), to 1e-6 relative. Every structure is far (>= 1e-3 A, or 20 steps) from the
discontinuities of loc_frame (the cutoff, rank swaps at its axis and sel boundaries).
"""

from __future__ import annotations

import numpy as np
import pytest

from app.physics.descriptors import LocFrame, SeA, vjp_from_blocks
from app.physics.forces import accumulate_forces_virial, atomic_virials
from app.physics.neighbors import neighbor_list

from .helpers import (
    STRUCTURES,
    WATER_AXIS_RULE,
    TestEnergy,
    assert_close_relative,
    boundaries_of,
    discontinuity_margin,
    evaluate,
    fd_forces,
    fd_virial,
    small_descriptors,
    structure,
    water_frame,
    water_loc_frame,
    water_se_a,
)

KINDS = ["se_e2_a", "loc_frame"]


def _small(kind, name):
    desc = small_descriptors()[KINDS.index(kind)]
    return desc, *structure(name)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(STRUCTURES))
def test_forces_match_finite_difference(name, kind):
    desc, positions, cell, pbc, types = _small(kind, name)
    energy = TestEnergy(desc.sel, seed=1)
    _, forces, _ = evaluate(desc, positions, cell, pbc, types, energy)
    assert_close_relative(forces, fd_forces(desc, positions, cell, pbc, types, energy), 1e-6, "forces")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(STRUCTURES))
def test_virial_matches_strain_derivative(name, kind):
    desc, positions, cell, pbc, types = _small(kind, name)
    energy = TestEnergy(desc.sel, seed=2)
    _, _, virial = evaluate(desc, positions, cell, pbc, types, energy)
    assert_close_relative(virial, fd_virial(desc, positions, cell, pbc, types, energy), 1e-6, "virial")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(STRUCTURES))
def test_forces_sum_to_zero(name, kind):
    desc, positions, cell, pbc, types = _small(kind, name)
    _, forces, _ = evaluate(desc, positions, cell, pbc, types, TestEnergy(desc.sel, seed=3))
    assert np.abs(forces).max() > 0.01
    np.testing.assert_allclose(forces.sum(axis=0), 0.0, atol=1e-12 * len(forces))


@pytest.mark.parametrize("kind", KINDS)
def test_water_box_forces_and_virial_match_finite_differences(kind):
    """The real water box (data_0 frame 0); a few atoms stand for all in the force check. A pair sits
    2e-5 A from rcut = 6 and loc_frame jumps there, so its step is 1e-7 A (and 1e-7 strain)."""
    desc = water_se_a() if kind == "se_e2_a" else water_loc_frame()
    positions, cell, types = water_frame(0)
    pbc = np.ones(3, bool)
    h = 1e-5 if kind == "se_e2_a" else 1e-7  # se_e2_a is smooth at rcut and drops nobody here
    if kind == "loc_frame":
        margin = discontinuity_margin(positions, cell, pbc, types, desc.rcut, boundaries_of(desc))
        assert margin > 20 * h * (1 + desc.rcut)
    energy = TestEnergy(desc.sel, seed=4)
    _, forces, virial = evaluate(desc, positions, cell, pbc, types, energy)
    atoms = [0, 37, 64, 150]  # two O, two H
    assert_close_relative(forces[atoms], fd_forces(desc, positions, cell, pbc, types, energy, h, atoms), 1e-6)
    assert_close_relative(virial, fd_virial(desc, positions, cell, pbc, types, energy, h), 1e-6, "virial")
    np.testing.assert_allclose(forces.sum(axis=0), 0.0, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_assembly_equals_whole_frame(kind):
    desc = water_se_a() if kind == "se_e2_a" else water_loc_frame()
    positions, cell, types = water_frame(1)
    energy = TestEnergy(desc.sel, seed=5)
    whole = evaluate(desc, positions, cell, None, types, energy)
    chunked = evaluate(desc, positions, cell, None, types, energy, chunk_size=50)
    np.testing.assert_allclose(chunked[0], whole[0], rtol=1e-13)
    np.testing.assert_allclose(chunked[1], whole[1], atol=1e-12)
    np.testing.assert_allclose(chunked[2], whole[2], atol=1e-11)


@pytest.mark.parametrize("kind", KINDS)
def test_atomic_virials_sum_to_virial(kind):
    desc, positions, cell, pbc, types = _small(kind, "triclinic")
    energy = TestEnergy(desc.sel, seed=6)
    nl = neighbor_list(positions, cell, pbc, desc.rcut)
    ch = desc.compute(nl, types)
    dEdr = desc.vjp(ch, energy(ch.env)[1])
    forces, virial = np.zeros_like(positions), np.zeros((3, 3))
    accumulate_forces_virial(ch.slots, 0, nl.j, dEdr, forces, virial)
    np.testing.assert_allclose(atomic_virials(ch.slots, dEdr).sum(axis=0), virial, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_isolated_atom_has_zero_force(kind):
    desc = small_descriptors()[KINDS.index(kind)]
    for cell in (None, np.eye(3) * 15.0):
        e, forces, virial = evaluate(
            desc, np.array([[1.0, 2.0, 3.0]]), cell, None, np.array([1]), TestEnergy(desc.sel)
        )
        np.testing.assert_array_equal(forces, 0.0)
        np.testing.assert_array_equal(virial, 0.0)


# ---------------------------------------------------------------------------------------------------------
# loc_frame's awkward cases still give exact forces

LOC = LocFrame(6.0, [2, 4], [2, 4], WATER_AXIS_RULE)


def _check_fd(desc, positions, types, h=1e-5, cell=None, pbc=None):
    energy = TestEnergy(desc.sel, seed=7)
    e, forces, virial = evaluate(desc, positions, cell, pbc, types, energy)
    assert np.isfinite(e) and np.isfinite(forces).all() and np.isfinite(virial).all()
    assert_close_relative(forces, fd_forces(desc, positions, cell, pbc, types, energy, h), 1e-6, "forces")
    assert_close_relative(virial, fd_virial(desc, positions, cell, pbc, types, energy, h), 1e-6, "virial")


def test_loc_frame_collinear_axis_atoms_forces_match_finite_difference():
    # the O's nearest two H are collinear with it; a displacement of 1e-5 would tilt them past the
    # collinearity tolerance (1e-6 rad) and switch the frame, so the step is 1e-7 A
    positions = np.array([[0, 0, 0], [0.95, 0, 0], [-1.0, 0, 0], [0.3, 1.5, 0.2], [2.5, 0.6, -1.1]], float)
    _check_fd(LOC, positions, np.array([0, 1, 1, 1, 0]), h=1e-7)


def test_loc_frame_linear_molecule_forces_match_finite_difference():
    # H-O-H on a line: e_y comes from the coordinate axis least aligned with e_x. The line points in a
    # generic direction: along a coordinate axis two components of e_x tie at zero and a 1e-7 step would
    # flip that choice (a jump of order the collinearity tolerance, invisible except to a derivative)
    line = np.array([0.48, -0.6, 0.64])
    positions = np.outer([0.0, 0.96, -1.01], line)
    _check_fd(LOC, positions, np.array([0, 1, 1]), h=1e-7)


def test_loc_frame_one_neighbour_forces_match_finite_difference():
    positions = np.array([[0.1, -0.2, 0.3], [0.8, 0.5, -0.4]])
    _check_fd(LOC, positions, np.array([0, 1]))


def test_loc_frame_missing_rule_element_forces_match_finite_difference():
    # an O with one H and two O: the rule's second H is missing, the nearest other neighbour stands in
    positions = np.array([[0, 0, 0], [0.97, 0.1, 0.0], [-0.4, 2.6, 0.3], [0.5, -0.7, 2.8]], float)
    _check_fd(LOC, positions, np.array([0, 1, 0, 0]))


@pytest.mark.parametrize("desc", [LocFrame(6.0, [1, 2], [1, 1], WATER_AXIS_RULE), SeA(6.0, 0.5, [2, 3])])
def test_more_neighbours_than_sel_forces_match_finite_difference(desc):
    rng = np.random.default_rng(0)
    dirs = rng.normal(size=(6, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    positions = np.vstack([[0, 0, 0], dirs * np.array([1.3, 1.0, 1.5, 1.1, 1.4, 1.2])[:, None]])
    types = np.array([0, 1, 1, 1, 1, 1, 1])
    assert discontinuity_margin(positions, None, None, types, desc.rcut, boundaries_of(desc)) > 1e-3
    _check_fd(desc, positions, types)


# ---------------------------------------------------------------------------------------------------------
# the service's VJP and training's Jacobian blocks give the same dE/drij


def _vjp_cases():
    se_a, loc = small_descriptors()
    for name in STRUCTURES:
        yield name, se_a, *structure(name)
        yield name, loc, *structure(name)
    collinear = np.array([[0, 0, 0], [0.95, 0, 0], [-1.0, 0, 0], [0.3, 1.5, 0.2], [2.5, 0.6, -1.1]], float)
    yield "collinear", LOC, collinear, None, None, np.array([0, 1, 1, 1, 0])
    yield "linear", LOC, np.outer([0.0, 0.96, -1.01], [0.48, -0.6, 0.64]), None, None, np.array([0, 1, 1])
    yield "dimer", LOC, np.array([[0.1, -0.2, 0.3], [0.8, 0.5, -0.4]]), None, None, np.array([0, 1])


@pytest.mark.parametrize("case", list(_vjp_cases()), ids=lambda c: f"{c[0]}-{c[1].kind}")
def test_vjp_equals_contraction_with_jacobian_blocks(case):
    _, desc, positions, cell, pbc, types = case
    ch = desc.compute(neighbor_list(positions, cell, pbc, desc.rcut), types)
    g = np.random.default_rng(8).standard_normal(ch.env.shape)
    direct = desc.vjp(ch, g)
    np.testing.assert_allclose(direct, vjp_from_blocks(ch, g), rtol=0, atol=1e-13 * np.abs(direct).max())
    np.testing.assert_array_equal(direct[~ch.slots.mask], 0.0)
