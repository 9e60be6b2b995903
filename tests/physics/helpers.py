"""Shared tools for the physics tests: a test energy on the environment array, finite differences,
structures (random, well separated from the discontinuities of loc_frame) and the water data frame.

The test energy (no network needed) is a fixed random smooth function of ``env`` (n, nslot, 4)::

    E = sum_i sum_m tanh(b_m + sum_(k, c) env[i, k, c] W[k, c, m]),     W[k] = W_group[group of slot k]

One weight block per neighbour-element group makes E invariant to permutations of the slots within a
group, so it is smooth wherever ``env`` is smooth up to such permutations (se_e2_a everywhere; loc_frame
away from its discontinuities). Its exact gradient is::

    dE/d env[i, k, c] = sum_m (1 - tanh^2(h_im)) W[k, c, m]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from app.physics.descriptors import LocFrame, SeA
from app.physics.environment import build_slots
from app.physics.forces import accumulate_forces_virial
from app.physics.neighbors import neighbor_list

WATER_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "water" / "data_0"
if not WATER_DIR.is_dir():
    WATER_DIR = Path("/work/shared/data/water/data_0")

# axis rule for type_map [O, H]: O uses its two nearest H; H its nearest O and nearest H
WATER_AXIS_RULE = [[[1, 0], [1, 1]], [[0, 0], [1, 0]]]


def water_loc_frame() -> LocFrame:
    return LocFrame(6.0, [16, 32], [30, 60], WATER_AXIS_RULE)


def water_se_a() -> SeA:
    return SeA(6.0, 0.5, [46, 92])


def water_frame(frame: int = 0):
    """positions (192, 3), cell (3, 3), types (192,) of data_0 frame ``frame`` (64 O then 128 H)."""
    coord = np.load(WATER_DIR / "set.000" / "coord.npy")[frame].astype(np.float64).reshape(-1, 3)
    cell = np.load(WATER_DIR / "set.000" / "box.npy")[frame].astype(np.float64).reshape(3, 3)
    types = np.array((WATER_DIR / "type.raw").read_text().split(), dtype=np.int64)
    return coord, cell, types


# ---------------------------------------------------------------------------------------------------------
# the test energy


class TestEnergy:
    """E(env) and dE/d env for a descriptor's slot layout (``sel`` per neighbour element)."""

    __test__ = False  # not a pytest class

    def __init__(self, sel, seed: int = 0, width: int = 4):
        sel = np.asarray(sel)
        rng = np.random.default_rng(seed)
        nslot = int(sel.sum())
        w_group = rng.normal(size=(len(sel), 4, width)) * 3.0 / nslot  # scaled so tanh is not saturated
        self.W = w_group[np.repeat(np.arange(len(sel)), sel)]  # (nslot, 4, width)
        self.b = rng.normal(scale=0.5, size=width)

    def __call__(self, env):
        h = np.einsum("ikc,kcm->im", env, self.W) + self.b  # (n, width)
        t = np.tanh(h)
        g = np.einsum("im,kcm->ikc", 1.0 - t * t, self.W)  # (n, nslot, 4)
        return float(t.sum()), g


def rotation_invariant_energy(env, width: int = 5):
    """A DeepPot-SE style contraction with a fixed embedding G(s) = tanh(a s + c): T = G^T R (width, 4),
    D = T[:, 1:] T[:, 1:]^T, E = sum tanh(D). Invariant under rotations when env rows rotate (se_e2_a)."""
    a = np.linspace(0.5, 2.0, width)
    c = np.linspace(-1.0, 1.0, width)
    G = np.tanh(env[..., :1] * a + c) * (env[..., :1] != 0)  # (n, nslot, width); empty slots give 0
    T = np.einsum("nkm,nkc->nmc", G, env) / env.shape[1]  # (n, width, 4)
    D = np.einsum("nmc,nlc->nml", T[..., 1:], T[..., 1:])  # (n, width, width)
    return np.tanh(D + T[..., 0:1]).sum()


# ---------------------------------------------------------------------------------------------------------
# energy, forces, virial and their finite differences


def evaluate(desc, positions, cell, pbc, types, energy, chunk_size=None):
    """E, forces (N, 3), virial (3, 3) from the descriptor's VJP and the force/virial assembly."""
    nl = neighbor_list(positions, cell, pbc, desc.rcut)
    forces = np.zeros_like(positions, dtype=np.float64)
    virial = np.zeros((3, 3))
    total = 0.0
    for ch in desc.chunks(nl, types, chunk_size):
        e, g = energy(ch.env)
        total += e
        dEdr = desc.vjp(ch, g)
        accumulate_forces_virial(ch.slots, ch.start, nl.j, dEdr, forces, virial)
    return total, forces, virial


def energy_only(desc, positions, cell, pbc, types, energy):
    nl = neighbor_list(positions, cell, pbc, desc.rcut)
    return energy(desc.compute(nl, types).env)[0]


def fd_forces(desc, positions, cell, pbc, types, energy, h=1e-5, atoms=None):
    """Central differences -dE/dr for the atoms ``atoms`` (default all): (len(atoms), 3)."""
    atoms = range(len(positions)) if atoms is None else atoms
    out = np.zeros((len(atoms), 3))
    for n, a in enumerate(atoms):
        for x in range(3):
            ep = []
            for sign in (1, -1):
                p = positions.copy()
                p[a, x] += sign * h
                ep.append(energy_only(desc, p, cell, pbc, types, energy))
            out[n, x] = -(ep[0] - ep[1]) / (2 * h)
    return out


def fd_virial(desc, positions, cell, pbc, types, energy, h=1e-5):
    """Xi = -dE/d eps by central differences; positions and cell both map to x (I + eps) (row vectors)."""
    out = np.zeros((3, 3))
    for a in range(3):
        for b in range(3):
            ep = []
            for sign in (1, -1):
                strain = np.eye(3)
                strain[a, b] += sign * h
                c = None if cell is None else cell @ strain
                ep.append(energy_only(desc, positions @ strain, c, pbc, types, energy))
            out[a, b] = -(ep[0] - ep[1]) / (2 * h)
    return out


def assert_close_relative(actual, expected, rtol=1e-6, what=""):
    """max |actual - expected| <= rtol * max |expected| (relative to the array's scale)."""
    scale = np.abs(expected).max()
    err = np.abs(actual - expected).max()
    assert scale > 0, f"{what}: reference is all zero"
    assert err <= rtol * scale, f"{what}: max error {err:.3e} vs scale {scale:.3e} (rtol {rtol})"


# ---------------------------------------------------------------------------------------------------------
# structures


def discontinuity_margin(positions, cell, pbc, types, rcut, boundaries):
    """Distance (Angstrom) from the nearest discontinuity of a rank-based descriptor.

    The smallest of |d - rcut| over all pairs and, for every centre (element tc) and neighbour element t,
    of the distance gaps d[b] - d[b - 1] between the neighbours ranked b - 1 and b, for the ranks b in
    ``boundaries[tc][t]`` where a swap changes the descriptor (see :func:`boundaries_of`). Finite
    differences of step h move distances by at most about h (1 + rcut), so they are valid if this is much
    larger than that.
    """
    nl = neighbor_list(positions, cell, pbc, rcut + 0.01)
    margin = np.abs(nl.d - rcut).min() if len(nl) else np.inf
    inside = neighbor_list(positions, cell, pbc, rcut)
    ntypes = len(boundaries)
    width = max(max(b, default=0) for row in boundaries for b in row) + 1
    slots = build_slots(inside, types, np.full(ntypes, width))
    r = np.where(slots.mask, slots.r, np.inf)
    for tc in range(ntypes):
        rows = types == tc
        for t, bs in enumerate(boundaries[tc]):
            for b in bs:
                lo, hi = r[rows, t * width + b - 1], r[rows, t * width + b]
                gap = hi[np.isfinite(hi)] - lo[np.isfinite(hi)]
                if len(gap):
                    margin = min(margin, gap.min())
    return margin


def boundaries_of(desc):
    """Ranks b (per centre element, per neighbour element) where swapping the neighbours ranked b - 1 and
    b changes the descriptor: the sel boundary (dropping) for both, and for loc_frame also the sel_a
    boundary (4 numbers or 1/r) and the ranks around its axis atoms."""
    nt = desc.ntypes
    if isinstance(desc, SeA):
        return [[[s] for s in desc.sel_] for _ in range(nt)]
    out = []
    for tc in range(nt):
        row = [[a, a + r] for a, r in zip(desc.sel_a_, desc.sel_r_, strict=True)]
        for t, rank in desc.axis_rule[tc]:
            row[t] += [b for b in (rank, rank + 1) if b > 0]
        out.append(row)
    return out


def random_structure(seed, natoms, cell, pbc, rcut, boundaries, min_dist=0.9, margin=1e-3):
    """Random positions with all distances >= min_dist and ``discontinuity_margin`` >= margin.

    Atoms are uniform in ``cell`` (for an isolated system, pass pbc all False: the cell is then only the box
    they are drawn in). Types: the first third element 0 (O-like), the rest element 1.
    Returns positions (N, 3), types (N,); deterministic for a seed.
    """
    rng = np.random.default_rng(seed)
    box = np.asarray(cell, dtype=np.float64)
    pbc = np.asarray(pbc, dtype=bool)
    real_cell = box if pbc.any() else None
    types = np.array([0 if k < natoms // 3 else 1 for k in range(natoms)])
    for _ in range(200):
        pos = np.zeros((0, 3))
        for _k in range(natoms):
            for _try in range(1000):
                trial = np.vstack([pos, rng.uniform(0, 1, 3) @ box])
                nl = neighbor_list(trial, real_cell, pbc, min_dist)
                if not len(nl):
                    pos = trial
                    break
            else:
                raise RuntimeError("cannot place atoms at min_dist")
        if discontinuity_margin(pos, real_cell, pbc, types, rcut, boundaries) >= margin:
            return pos, types
    raise RuntimeError("no well-separated structure found")


def random_rotation(seed):
    """A random proper rotation matrix (3, 3)."""
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


# the small systems of the finite-difference and invariance tests: (cell, pbc, natoms)
RCUT = 4.0
STRUCTURES = {
    # triclinic, periodic in all directions; rcut is more than half the cell heights (images of neighbours)
    "triclinic": ([[6.5, 0.0, 0.0], [1.2, 6.0, 0.0], [-0.9, 0.7, 6.2]], [True, True, True], 18),
    # a cell smaller than the cutoff: every atom sees several images of each neighbour and of itself
    "small_cell": ([[3.2, 0.0, 0.0], [0.4, 3.0, 0.0], [0.3, -0.5, 3.4]], [True, True, True], 3),
    # periodic in x and z only (a slab)
    "mixed_pbc": ([[6.0, 0.0, 0.0], [0.5, 5.0, 0.0], [0.8, 0.3, 6.5]], [True, False, True], 15),
    # a cluster without a cell (the cell here only bounds where atoms are drawn)
    "isolated": ([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0]], [False, False, False], 12),
}


def small_descriptors():
    """(se_e2_a, loc_frame) for the small structures: O-like element 0, H-like element 1, rcut 4."""
    se_a = SeA(RCUT, 1.0, [24, 48])
    # sel_a even for element 0: in the small cell an O's O neighbours are its own images, which come in
    # (+S, -S) pairs at equal distance; an odd boundary would split such a tie between an a- and an r-slot
    loc = LocFrame(RCUT, [4, 6], [20, 42], WATER_AXIS_RULE)
    return se_a, loc


_structure_cache: dict = {}


def structure(name, seed=1):
    """positions, cell (None when isolated), pbc, types of a STRUCTURES entry, well separated (1e-3 A)
    from the discontinuities of both small descriptors."""
    key = (name, seed)
    if key not in _structure_cache:
        cell, pbc, natoms = STRUCTURES[name]
        se_a, loc = small_descriptors()
        b1, b2 = boundaries_of(se_a), boundaries_of(loc)
        both = [
            [sorted(set(x) | set(y)) for x, y in zip(r1, r2, strict=True)]
            for r1, r2 in zip(b1, b2, strict=True)
        ]
        pos, types = random_structure(seed, natoms, cell, pbc, RCUT, both)
        cell = np.array(cell) if any(pbc) else None
        _structure_cache[key] = (pos, cell, np.array(pbc), types)
    pos, cell, pbc, types = _structure_cache[key]
    return pos.copy(), None if cell is None else cell.copy(), pbc.copy(), types.copy()
