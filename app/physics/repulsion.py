"""Short-range pair repulsion (ZBL) added below the distances a model was trained on.

A Deep Potential knows nothing about configurations its training data never visited; two atoms pushed
closer than any pair in the data (a hot MD step, a bad initial structure) may find an attraction that
is pure extrapolation, and dynamics collapse. deepmd-kit offers a tabulated pair potential for this
(``use_srtab``); here the Ziegler-Biersack-Littmark universal screened nuclear repulsion is switched on
below each element pair's training range:

    E_rep = sum over pairs i<j of  phi_ZBL(r_ij; Z_i, Z_j) * S(r_ij),

with S = 1 below ``r_inner``, 0 above ``r_outer`` and the C2 smoothstep 1 - 10t^3 + 15t^4 - 6t^5,
t = (r - r_inner) / (r_outer - r_inner), in between. The export chooses ``r_outer`` below the closest pair
of that element pair in the training data, so the term is exactly zero on every training frame: the
model's accuracy is untouched, and only the unexplored close range changes. Forces are -dE/dr and the
virial Xi = -sum_pairs r_ij (outer) dE/dr_ij (design.md's sign), tested against finite differences.
"""

from __future__ import annotations

import numpy as np
from ase.data import atomic_numbers

from app.physics.neighbors import neighbor_list

__all__ = ["PairRepulsion", "zbl", "smoothstep"]

_KE = 14.399645  # e^2 / (4 pi eps0), eV A
_A0 = 0.46850  # 0.8854 * Bohr radius, A
_C = np.array([0.18175, 0.50986, 0.28022, 0.02817])
_D = np.array([3.19980, 0.94229, 0.40290, 0.20162])


def zbl(r: np.ndarray, z1: np.ndarray, z2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ZBL pair energy (eV) and its derivative d/dr (eV/A) at distances r (A) for atomic numbers z1, z2."""
    a = _A0 / (z1**0.23 + z2**0.23)
    x = r[:, None] / a[:, None]
    ex = _C * np.exp(-_D * x)  # (P, 4)
    phi = ex.sum(1)
    dphi = -(ex * _D).sum(1) / a
    pref = _KE * z1 * z2
    e = pref * phi / r
    de = pref * (dphi / r - phi / (r * r))
    return e, de


def smoothstep(r: np.ndarray, r_in: np.ndarray, r_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """S(r): 1 below r_in, 0 above r_out, C2 quintic in between; and dS/dr."""
    w = r_out - r_in
    t = np.clip((r - r_in) / w, 0.0, 1.0)
    s = 1.0 - t**3 * (10.0 - 15.0 * t + 6.0 * t * t)
    ds = -30.0 * t * t * (1.0 - t) ** 2 / w
    return s, ds


class PairRepulsion:
    """ZBL repulsion per element pair of a model, switched off from r_inner to r_outer (manifest section
    ``repulsion``: ``{"type": "zbl", "pairs": {"O-H": [r_inner, r_outer], ...}}``; pairs not listed get
    none)."""

    def __init__(self, type_map: list[str], spec: dict):
        if spec.get("type") != "zbl":
            raise ValueError(f"repulsion type must be 'zbl', got {spec.get('type')!r}")
        nt = len(type_map)
        self.type_map = list(type_map)
        self.spec = spec
        self.r_in = np.zeros((nt, nt))
        self.r_out = np.zeros((nt, nt))
        for key, (r_in, r_out) in spec.get("pairs", {}).items():
            a, _, b = key.partition("-")
            if a not in type_map or b not in type_map:
                raise ValueError(f"repulsion pair {key!r}: elements must be in type_map {type_map}")
            if not 0 < float(r_in) < float(r_out):
                raise ValueError(f"repulsion pair {key!r}: need 0 < r_inner < r_outer, got {r_in}, {r_out}")
            ia, ib = type_map.index(a), type_map.index(b)
            self.r_in[ia, ib] = self.r_in[ib, ia] = float(r_in)
            self.r_out[ia, ib] = self.r_out[ib, ia] = float(r_out)
        self.z = np.array([atomic_numbers[e] for e in type_map], dtype=np.float64)
        self.cutoff = float(self.r_out.max())

    def compute(self, types, positions, cell=None, pbc=None):
        """(atomic energies (N,), forces (N, 3), virial (3, 3)), all zero when no pair is close."""
        types = np.asarray(types, dtype=np.int64)
        n = len(types)
        e_at, forces, virial = np.zeros(n), np.zeros((n, 3)), np.zeros((3, 3))
        if self.cutoff <= 0 or n < 2:
            return e_at, forces, virial
        nl = neighbor_list(positions, cell, pbc, self.cutoff)
        return self.from_pairs(types, nl.i, nl.j, nl.D, nl.d)

    def from_pairs(self, types, i, j, D, d=None):
        """The same from a full pair list (each pair twice; D = r_j - r_i with images) of any cutoff >=
        ``self.cutoff``, e.g. the model's own. ``i``: the centres, or a function giving the centres of given
        pair indices (a list grouped by centre need not expand them all)."""
        types = np.asarray(types, dtype=np.int64)
        n = len(types)
        e_at, forces, virial = np.zeros(n), np.zeros((n, 3)), np.zeros((3, 3))
        if len(j) == 0 or self.cutoff <= 0:
            return e_at, forces, virial
        # candidates within the largest r_outer first (cheap on the full list), then per element pair
        d2 = np.einsum("px,px->p", D, D) if d is None else d * d
        cand = np.flatnonzero(d2 < self.cutoff * self.cutoff)
        if len(cand) == 0:
            return e_at, forces, virial
        i = i(cand) if callable(i) else i[cand]
        j, D, r = j[cand], D[cand], np.sqrt(d2[cand])
        ti, tj = types[i], types[j]
        close = r < self.r_out[ti, tj]
        if not close.any():
            return e_at, forces, virial
        i, j, D, r = i[close], j[close], D[close], r[close]
        ti, tj = ti[close], tj[close]
        e, de = zbl(r, self.z[ti], self.z[tj])
        s, ds = smoothstep(r, self.r_in[ti, tj], self.r_out[ti, tj])
        # the full list holds each pair twice: half the pair energy on each atom
        np.add.at(e_at, i, 0.5 * e * s)
        dEdr = 0.5 * (de * s + e * ds)[:, None] * D / r[:, None]  # dE/dr_ij of this half, r_ij = D
        np.add.at(forces, i, dEdr)
        np.add.at(forces, j, -dEdr)
        virial -= D.T @ dEdr
        return e_at, forces, virial


def closest_pairs(systems, type_map: list[str], cutoff: float = 3.0) -> dict[str, float]:
    """The closest distance of each element pair over all frames of ``systems`` (training.data systems),
    for pairs seen within ``cutoff``."""
    nt = len(type_map)
    best = np.full((nt, nt), np.inf)
    for s in systems:
        for f in range(s.nframes):
            cell = s.cells[f] if s.cells is not None else None
            nl = neighbor_list(s.coords[f], cell, s.pbc, cutoff)
            if not len(nl):
                continue
            ti, tj = s.types[nl.i], s.types[nl.j]
            np.minimum.at(best, (ti, tj), nl.d)
    best = np.minimum(best, best.T)
    return {f"{type_map[a]}-{type_map[b]}": float(best[a, b]) for a in range(nt) for b in range(a, nt) if np.isfinite(best[a, b])}


def repulsion_for(systems, type_map: list[str], inner: float = 0.65, outer: float = 0.85, cutoff: float = 3.0) -> dict:
    """A ``repulsion`` manifest section: per element pair, r_outer = outer x and r_inner = inner x the
    closest distance in the data (pairs never closer than ``cutoff`` in the data get r_outer = outer x
    cutoff)."""
    seen = closest_pairs(systems, type_map, cutoff)
    pairs = {}
    for a in range(len(type_map)):
        for b in range(a, len(type_map)):
            key = f"{type_map[a]}-{type_map[b]}"
            d = seen.get(key, cutoff)
            pairs[key] = [round(inner * d, 4), round(outer * d, 4)]
    return {"type": "zbl", "pairs": pairs, "closest_in_training_data": seen}
