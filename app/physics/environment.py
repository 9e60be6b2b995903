"""Per-atom neighbour slots: the padded, sorted neighbour table both descriptors are built on.

For every centre atom i the neighbours within the cutoff are sorted by element, then distance, then
neighbour index (ties), and placed into ``nslot = sum(sel)`` slots: element t owns the slots
``offset[t] .. offset[t] + sel[t]``, nearest first. Empty slots are marked ``-1`` in ``pair`` and have
zero vectors. Neighbours beyond ``sel[t]`` are dropped and counted in ``n_dropped`` so callers can warn.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .neighbors import NeighborList

__all__ = ["Slots", "build_slots"]


@dataclass
class Slots:
    """Neighbour table of a block of centre atoms.

    pair (n, nslot) int: index into the neighbour list's pairs, -1 for an empty slot.
    rij (n, nslot, 3): r_j + S @ cell - r_i for each filled slot, zero otherwise.
    r (n, nslot): |rij|, zero for empty slots.
    mask (n, nslot) bool: slot is filled.
    n_dropped (n,) int: neighbours within the cutoff that did not fit in sel.
    """

    pair: np.ndarray
    rij: np.ndarray
    r: np.ndarray
    mask: np.ndarray
    n_dropped: np.ndarray

    @property
    def natoms(self) -> int:
        return self.pair.shape[0]


def build_slots(
    nl: NeighborList,
    types: np.ndarray,
    sel: np.ndarray,
    centers: slice | None = None,
) -> Slots:
    """Sort neighbours of the centre atoms ``centers`` (a contiguous slice; default all) into slots.

    ``types`` (N,) element index of every atom; ``sel`` (ntypes,) slots per neighbour element.
    The neighbour list must be sorted by centre ``i`` (as :func:`neighbor_list` returns it).
    """
    types = np.asarray(types)
    sel = np.asarray(sel, dtype=np.int64)
    ntypes = len(sel)
    natoms_total = len(types)
    if centers is None:
        centers = slice(0, natoms_total)
    c0, c1 = centers.start, centers.stop
    n = c1 - c0
    nslot = int(sel.sum())
    offset = np.concatenate([[0], np.cumsum(sel)[:-1]])

    # the pairs whose centre lies in [c0, c1): contiguous because the list is sorted by i
    p0, p1 = np.searchsorted(nl.i, [c0, c1])
    pi = nl.i[p0:p1] - c0  # (P,)
    pj = nl.j[p0:p1]
    pd = nl.d[p0:p1]
    tj = types[pj]  # (P,)
    P = len(pi)

    pair = np.full((n, nslot), -1, dtype=np.int64)
    n_dropped = np.zeros(n, dtype=np.int64)
    if P == 0:
        return Slots(pair, np.zeros((n, nslot, 3)), np.zeros((n, nslot)), np.zeros((n, nslot), bool), n_dropped)

    # rank of each pair among its centre's pairs, ordered by element, then distance, then neighbour index
    counts = np.bincount(pi, minlength=n)
    row_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    order = np.lexsort((pj, pd, tj, pi))
    rank_row = np.empty(P, dtype=np.int64)
    rank_row[order] = np.arange(P) - row_start[pi[order]]
    # rank within (centre, element): subtract the number of the centre's neighbours of lower elements
    count_it = np.bincount(pi * ntypes + tj, minlength=n * ntypes).reshape(n, ntypes)
    lower = np.concatenate([np.zeros((n, 1), np.int64), np.cumsum(count_it, axis=1)[:, :-1]], axis=1)
    rank_t = rank_row - lower[pi, tj]
    keep = rank_t < sel[tj]
    n_dropped = np.bincount(pi[~keep], minlength=n)
    slot = offset[tj] + rank_t
    pair[pi[keep], slot[keep]] = np.arange(p0, p1)[keep]

    mask = pair >= 0
    rij = np.zeros((n, nslot, 3))
    r = np.zeros((n, nslot))
    rij[mask] = nl.D[pair[mask]]
    r[mask] = nl.d[pair[mask]]
    return Slots(pair, rij, r, mask, n_dropped)
