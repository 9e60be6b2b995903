"""Descriptor values: invariances, supercells, cutoff behaviour, loc_frame's awkward cases and one water
molecule written out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from app.physics.descriptors import LocFrame, SeA
from app.physics.neighbors import neighbor_list

from .helpers import (
    STRUCTURES,
    WATER_AXIS_RULE,
    TestEnergy,
    random_rotation,
    rotation_invariant_energy,
    small_descriptors,
    structure,
    water_frame,
    water_loc_frame,
    water_se_a,
)

KINDS = ["se_e2_a", "loc_frame"]


def _env(desc, positions, cell, pbc, types):
    ch = desc.compute(neighbor_list(positions, cell, pbc, desc.rcut), types)
    assert np.isfinite(ch.env).all()
    return ch


def _system(name, kind):
    """(descriptor, positions, cell, pbc, types): the water box or one of the small structures."""
    if name == "water":
        positions, cell, types = water_frame(0)
        desc = water_se_a() if kind == "se_e2_a" else water_loc_frame()
        return desc, positions, cell, np.ones(3, bool), types
    desc = small_descriptors()[KINDS.index(kind)]
    positions, cell, pbc, types = structure(name)
    return desc, positions, cell, pbc, types


def _groups(desc):
    """Slot ranges within which slots are ranked by distance only (ties may come in either order)."""
    if isinstance(desc, SeA):
        edges = np.cumsum([0, *desc.sel_])
        return list(zip(edges[:-1], edges[1:], strict=True))
    out, off = [], 0
    for a, r in zip(desc.sel_a_, desc.sel_r_, strict=True):
        out += [(off, off + a), (off + a, off + a + r)]
        off += a + r
    return out


def _canonical(env, desc):
    """env with the rows of each slot group sorted (by the rounded row): insensitive to the order of exact
    distance ties, such as the (+S, -S) images of an atom in a small cell."""
    env = env.copy()
    for a, b in _groups(desc):
        block = env[:, a:b]
        keys = np.round(block, 9).transpose(2, 0, 1)[::-1]  # last key (column 0) is the primary one
        order = np.lexsort(keys, axis=-1)
        env[:, a:b] = np.take_along_axis(block, order[..., None], axis=1)
    return env


def _assert_same_env(env1, env2, desc, atol=1e-10):
    np.testing.assert_allclose(_canonical(env1, desc), _canonical(env2, desc), atol=atol, rtol=0)


SYSTEMS = ["water", *STRUCTURES]


# ---------------------------------------------------------------------------------------------------------
# invariances


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", SYSTEMS)
def test_rotation_invariance(name, kind):
    desc, positions, cell, pbc, types = _system(name, kind)
    R = random_rotation(7)
    env = _env(desc, positions, cell, pbc, types).env
    env_rot = _env(desc, positions @ R, None if cell is None else cell @ R, pbc, types).env
    if kind == "loc_frame":
        # the local frame turns with the atoms: the descriptor itself is invariant
        _assert_same_env(env_rot, env, desc)
    else:
        # se_e2_a rows s(r) (1, x/r, y/r, z/r) rotate; s and the Gram matrix of the xyz columns do not,
        # and neither does a DeepPot-SE contraction built on them
        rotated = env.copy()
        rotated[..., 1:] = env[..., 1:] @ R
        _assert_same_env(env_rot, rotated, desc)
        np.testing.assert_allclose(env_rot[..., 0], env[..., 0], atol=1e-12)
        gram = np.einsum("nkc,nlc->nkl", env[..., 1:], env[..., 1:])
        gram_rot = np.einsum("nkc,nlc->nkl", env_rot[..., 1:], env_rot[..., 1:])
        if name != "small_cell":  # there exact ties may swap slots; the contraction below is immune
            np.testing.assert_allclose(gram_rot, gram, atol=1e-12)
        np.testing.assert_allclose(
            rotation_invariant_energy(env_rot), rotation_invariant_energy(env), rtol=1e-12
        )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", SYSTEMS)
def test_translation_invariance(name, kind):
    desc, positions, cell, pbc, types = _system(name, kind)
    env = _env(desc, positions, cell, pbc, types).env
    shifted = positions + np.array([0.37, -1.21, 2.53])
    _assert_same_env(_env(desc, shifted, cell, pbc, types).env, env, desc)
    if cell is not None:
        # and wrapped back into the cell along the periodic directions
        frac = np.linalg.solve(cell.T, shifted.T).T
        frac[:, pbc] %= 1.0
        _assert_same_env(_env(desc, frac @ cell, cell, pbc, types).env, env, desc)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", SYSTEMS)
def test_permutation_invariance(name, kind):
    desc, positions, cell, pbc, types = _system(name, kind)
    perm = np.random.default_rng(3).permutation(len(positions))
    env = _env(desc, positions, cell, pbc, types).env
    env_perm = _env(desc, positions[perm], cell, pbc, types[perm]).env
    # new atom a is old atom perm[a]: it has the same environment
    _assert_same_env(env_perm, env[perm], desc)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "name, reps",
    [("water", (2, 1, 1)), ("water", (2, 2, 2)), ("triclinic", (2, 1, 1)), ("small_cell", (2, 2, 2))],
)
def test_supercell_gives_identical_per_atom_descriptors(name, reps, kind):
    desc, positions, cell, pbc, types = _system(name, kind)
    n = len(positions)
    shifts = np.array([[a, b, c] for a in range(reps[0]) for b in range(reps[1]) for c in range(reps[2])])
    big = np.concatenate([positions + s @ cell for s in shifts])  # copy m of atom i is atom m * n + i
    big_cell = np.diag(reps) @ cell
    env = _env(desc, positions, cell, pbc, types).env
    env_big = _env(desc, big, big_cell, pbc, np.tile(types, len(shifts))).env
    for m in range(len(shifts)):
        _assert_same_env(env_big[m * n : (m + 1) * n], env, desc)


# ---------------------------------------------------------------------------------------------------------
# cutoff and empty environments


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("periodic", [False, True])
def test_isolated_atom_has_zero_descriptor(kind, periodic):
    desc = small_descriptors()[KINDS.index(kind)]
    cell = np.eye(3) * 15.0 if periodic else None  # no image within the cutoff
    ch = _env(desc, np.array([[1.0, 2.0, 3.0]]), cell, [periodic] * 3, np.array([0]))
    assert ch.env.shape == (1, desc.nslot, 4)
    np.testing.assert_array_equal(ch.env, 0.0)
    assert not ch.slots.mask.any()


def _dimer(d):
    return np.array([[0.0, 0.0, 0.0], [d, 0.0, 0.0]]), np.array([0, 1])


@pytest.mark.parametrize("kind", KINDS)
def test_pair_just_inside_cutoff_is_a_neighbour(kind):
    desc = small_descriptors()[KINDS.index(kind)]
    rc = desc.rcut
    positions, types = _dimer(rc - 1e-6)
    ch = _env(desc, positions, None, None, types)
    h_slot = desc.sel[0]  # the O's first H slot
    assert ch.slots.mask[0, h_slot] and ch.slots.mask[1].sum() == 1
    if kind == "loc_frame":
        # (1/r, x/r^2, y/r^2, z/r^2) with the neighbour on e_x: (1/r, 1/r, 0, 0)
        np.testing.assert_allclose(ch.env[0, h_slot], [1 / (rc - 1e-6), 1 / (rc - 1e-6), 0, 0], rtol=1e-12)
    else:
        # s(r) vanishes at rcut like (rcut - r)^3: present but ~1e-18
        assert 0.0 <= ch.env[0, h_slot, 0] < 1e-15


@pytest.mark.parametrize("kind", KINDS)
def test_pair_just_beyond_cutoff_is_not_a_neighbour(kind):
    desc = small_descriptors()[KINDS.index(kind)]
    positions, types = _dimer(desc.rcut + 1e-6)
    ch = _env(desc, positions, None, None, types)
    assert not ch.slots.mask.any()
    np.testing.assert_array_equal(ch.env, 0.0)


def _energy_with_far_atom(desc, d):
    """A water molecule plus an H at distance d from the O (along -z, away from the molecule)."""
    from .helpers import evaluate

    positions = np.array([[0.0, 0.0, 0.0], [0.9572, 0.0, 0.0], [-0.24, 0.9266, 0.0], [0.0, 0.0, -d]])
    types = np.array([0, 1, 1, 1])
    return evaluate(desc, positions, None, None, types, TestEnergy(desc.sel, seed=5))


def test_se_e2_a_energy_is_continuous_across_cutoff():
    desc = small_descriptors()[0]
    e_in, f_in, _ = _energy_with_far_atom(desc, desc.rcut - 1e-6)
    e_out, f_out, _ = _energy_with_far_atom(desc, desc.rcut + 1e-6)
    assert abs(e_in - e_out) < 1e-9
    # and the force on the far atom vanishes there too (s' = 0 at rcut)
    assert np.abs(f_in[3]).max() < 1e-9 and np.abs(f_out[3]).max() == 0.0


def test_loc_frame_energy_jumps_at_cutoff():
    """The seed's known weakness (stated by its authors): 1/r does not go to zero at rcut."""
    desc = small_descriptors()[1]
    e_in, _, _ = _energy_with_far_atom(desc, desc.rcut - 1e-6)
    e_out, _, _ = _energy_with_far_atom(desc, desc.rcut + 1e-6)
    assert abs(e_in - e_out) > 1e-4


# ---------------------------------------------------------------------------------------------------------
# loc_frame's awkward cases

LOC = LocFrame(6.0, [2, 4], [2, 4], WATER_AXIS_RULE)


def test_loc_frame_collinear_axis_atoms_use_next_ranked_neighbour():
    # the O's two nearest H lie on one line through it: the third H builds e_y instead
    positions = np.array([[0, 0, 0], [0.95, 0, 0], [-1.0, 0, 0], [0.3, 1.5, 0.2], [2.5, 0.6, -1.1]], float)
    types = np.array([0, 1, 1, 1, 0])
    ch = _env(LOC, positions, None, None, types)
    h0 = LOC.sel[0]  # first H slot; H ranks by distance: 0.95 (atom 1), 1.0 (atom 2), 1.54 (atom 3)
    np.testing.assert_array_equal(ch.axis[0], [h0, h0 + 2])
    # frame: e_x = x, e_y from atom 3 -> (0, 1.5, 0.2)/|.|, so atom 2's row is (1, -1, 0, 0)
    np.testing.assert_allclose(ch.env[0, h0 + 1], [1.0, -1.0, 0.0, 0.0], atol=1e-14)
    ey = np.array([0, 1.5, 0.2]) / np.hypot(1.5, 0.2)
    r3 = np.linalg.norm([0.3, 1.5, 0.2])
    np.testing.assert_allclose(
        ch.env[0, h0 + 2], [1 / r3, 0.3 / r3**2, ey @ [0.3, 1.5, 0.2] / r3**2, 0], atol=1e-14
    )


def test_loc_frame_linear_molecule_is_finite():
    # H-O-H on a line: no second axis atom anywhere, e_y comes from a fixed coordinate axis
    positions = np.array([[0, 0, 0], [0.96, 0, 0], [-0.96, 0, 0]], float)
    ch = _env(LOC, positions, None, None, np.array([0, 1, 1]))
    assert (ch.axis[:, 0] >= 0).all() and (ch.axis[:, 1] == -1).all()
    np.testing.assert_allclose(ch.env[..., 2:], 0.0, atol=1e-15)  # every neighbour lies on e_x


def test_loc_frame_one_neighbour_frame_is_finite():
    positions, types = _dimer(1.1)
    ch = _env(LOC, positions, None, None, types)
    np.testing.assert_array_equal(ch.axis[:, 1], -1)
    np.testing.assert_allclose(ch.env[0, LOC.sel[0]], [1 / 1.1, 1 / 1.1, 0, 0], atol=1e-15)
    np.testing.assert_allclose(ch.env[1, 0], [1 / 1.1, 1 / 1.1, 0, 0], atol=1e-15)


def test_loc_frame_no_neighbour_gives_zero():
    positions, types = _dimer(7.0)
    ch = _env(LOC, positions, None, None, types)
    np.testing.assert_array_equal(ch.axis, -1)
    np.testing.assert_array_equal(ch.env, 0.0)


@pytest.mark.parametrize("desc", [LocFrame(6.0, [1, 2], [1, 1], WATER_AXIS_RULE), SeA(6.0, 0.5, [2, 3])])
def test_more_neighbours_than_sel_drops_the_farthest(desc):
    rng = np.random.default_rng(0)
    dirs = rng.normal(size=(6, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    dist = np.array([1.3, 1.0, 1.5, 1.1, 1.4, 1.2])
    positions = np.vstack([[0, 0, 0], dirs * dist[:, None]])  # an O with six H at distinct distances
    types = np.array([0, 1, 1, 1, 1, 1, 1])
    ch = _env(desc, positions, None, None, types)
    h0 = desc.sel[0]
    kept = ch.slots.r[0, h0:]
    np.testing.assert_allclose(kept, [1.0, 1.1, 1.2])  # the three nearest H, nearest first
    assert ch.slots.n_dropped[0] == 3
    # every H sees the O and five H, of which three fit
    np.testing.assert_array_equal(ch.slots.n_dropped[1:], 5 - 3)


# ---------------------------------------------------------------------------------------------------------
# one water molecule by hand


def test_water_molecule_loc_frame_by_hand():
    """O at the origin, H1 on x at 0.9572 A, H2 at 1 A in the xy plane at theta = 104.52 deg from H1.

    type_map [O, H], sel_a [1, 2], sel_r [1, 1]: per centre, slots O(a), O(r), H(a), H(a), H(r).
    cos(theta) = -0.2507179360729566, sin(theta) = 0.9680601822879179; r1 = 0.9572, 1/r1 = 1.0447137484329294
    |H1 - H2| = r12 = sqrt(1 + r1^2 - 2 r1 cos) = 1.5479684288828595, 1/r12 = 0.6460080072315698

    O: e_x along H1, e_y towards H2: H1 (1/r1, r1/r1^2, 0, 0); H2 at r = 1: (1, cos, sin, 0).
    H1: e_x towards O = -x, e_y = +y (H2 side), e_z = -z. O: (1/r1, 1/r1, 0, 0);
        H2 - H1 = (cos - r1, sin, 0): q = (r1 - cos, sin, 0) / r12^2 = (0.5040959778132603, 0.4039970180085452).
    H2: e_x towards O. O at r = 1: (1, 1, 0, 0); H1: q_x = projection on H2->O = 1 - r1 cos,
        q_y = distance of H1 from the O-H2 line = r1 sin; / r12^2 = (0.5174793300371472, 0.38670594563777944).
    """
    desc = LocFrame(6.0, [1, 2], [1, 1], WATER_AXIS_RULE)
    c, s, r1 = -0.2507179360729566, 0.9680601822879179, 0.9572
    positions = np.array([[0.0, 0.0, 0.0], [r1, 0.0, 0.0], [c, s, 0.0]])
    ch = _env(desc, positions, None, None, np.array([0, 1, 1]))
    inv_r1, inv_r12 = 1.0447137484329294, 0.6460080072315698
    zero = [0.0, 0.0, 0.0, 0.0]
    expected = np.array(
        [
            [zero, zero, [inv_r1, inv_r1, 0, 0], [1.0, c, s, 0], zero],  # O
            [
                [inv_r1, inv_r1, 0, 0],
                zero,
                [inv_r12, 0.5040959778132603, 0.4039970180085452, 0],
                zero,
                zero,
            ],  # H1
            [[1.0, 1.0, 0, 0], zero, [inv_r12, 0.5174793300371472, 0.38670594563777944, 0], zero, zero],  # H2
        ]
    )
    np.testing.assert_allclose(ch.env, expected, atol=1e-12)
    # the network's flat input: the four numbers of the three a-slots, then 1/r of the two r-slots
    np.testing.assert_allclose(
        desc.features(ch.env)[0], [*zero, inv_r1, inv_r1, 0, 0, 1.0, c, s, 0, 0, 0], atol=1e-12
    )


def test_se_e2_a_switching_function():
    desc = SeA(6.0, 2.0, [1])
    r = np.array([1.0, 2.0, 4.0, 6.0])
    s, ds = desc.switch(r)
    # 1/r inside rcut_smth; at the midpoint u = 1/2 the polynomial is 1/2; zero at rcut
    np.testing.assert_allclose(s, [1.0, 0.5, 0.5 / 4.0, 0.0], atol=1e-15)
    h = 1e-6
    rr = np.array([1.5, 2.5, 3.3, 5.9])
    fd = (desc.switch(rr + h)[0] - desc.switch(rr - h)[0]) / (2 * h)
    np.testing.assert_allclose(desc.switch(rr)[1], fd, rtol=1e-7)


# ---------------------------------------------------------------------------------------------------------
# the fast paths agree with the rules they shortcut


@pytest.mark.parametrize("name", SYSTEMS)
def test_axis_choice_matches_general_rule(name):
    desc, positions, cell, pbc, types = _system(name, "loc_frame")
    ch = _env(desc, positions, cell, pbc, types)
    s = ch.slots
    np.testing.assert_array_equal(ch.axis, desc._choose_axes_general(s.mask, s.r, s.rij, types))


def test_exact_distance_ties_are_ordered_by_neighbour_index():
    # a simple cubic crystal (two elements on alternating sites): every shell is a set of exact ties
    grid = np.stack(np.meshgrid(*[np.arange(4)] * 3, indexing="ij"), -1).reshape(-1, 3) * 2.0
    types = grid.sum(axis=1).astype(int) // 2 % 2
    desc = SeA(4.5, 1.0, [40, 40])
    nl = neighbor_list(grid, np.eye(3) * 8.0, [True] * 3, desc.rcut)
    s = desc.compute(nl, types).slots
    j = np.where(s.mask, nl.j[np.maximum(s.pair, 0)], -1)
    for a, b in _groups(desc):
        r, jj, m = s.r[:, a:b], j[:, a:b], s.mask[:, a:b]
        assert m.any()
        key_ok = (r[:, 1:] > r[:, :-1]) | ((r[:, 1:] == r[:, :-1]) & (jj[:, 1:] >= jj[:, :-1]))
        assert (key_ok | ~m[:, 1:]).all()
    assert (np.diff(s.r[:, :40], axis=1)[s.mask[:, 1:40]] == 0).any()  # there are ties to break
