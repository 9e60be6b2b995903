"""Per-atom neighbour slots: the padded, sorted neighbour table both descriptors are built on.

For every centre atom i the neighbours within the cutoff are sorted by element, then distance, then
neighbour index (ties), then the components x, y, z of the pair vector (two images of one atom at the same
distance, as an atom's own images +S and -S in a small cell), so that the order never depends on the
neighbour list's internal order, and placed into ``nslot = sum(sel)`` slots: element t owns the slots
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
    The neighbour list must be sorted by centre ``i`` (as :func:`neighbor_list` returns it); the order
    within a centre does not matter (ties in distance are broken by neighbour index here).
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
    pi = nl.i[p0:p1] - c0  # (P,) local centre index
    tj = types[nl.j[p0:p1]]  # (P,) neighbour element

    pair = np.full((n, nslot), -1, dtype=np.int64)
    n_dropped = np.zeros(n, dtype=np.int64)
    if p1 == p0:
        return Slots(pair, np.zeros((n, nslot, 3)), np.zeros((n, nslot)), np.zeros((n, nslot), bool), n_dropped)
    # One element at a time (a loop over elements, not atoms): lay each centre's neighbours of element t
    # out in a padded row (n, width), sort every row by distance, keep the first sel[t]. Sorting short
    # rows costs far less than one global sort of all pairs by (centre, element, distance, index).
    for t in range(ntypes):
        idx = np.flatnonzero(tj == t)  # (P_t,) still grouped by centre
        if len(idx) == 0:
            continue
        it = pi[idx]
        counts = np.bincount(it, minlength=n)  # (n,)
        col = np.arange(len(idx)) - (np.cumsum(counts) - counts)[it]  # position within the centre's row
        width = int(counts.max())
        gid = idx + p0  # global pair index
        dpad = np.full((n, width), np.inf)
        dpad[it, col] = np.take(nl.d, gid)
        ppad = np.full((n, width), -1, dtype=np.int64)
        ppad[it, col] = gid
        order = np.argsort(dpad, axis=1)  # (n, width) nearest first
        psort = np.take_along_axis(ppad, order, axis=1)
        dsort = np.take_along_axis(dpad, order, axis=1)
        # ties only matter among the kept neighbours and across the sel boundary
        head = dsort[:, : int(sel[t]) + 1]
        tie = (head[:, 1:] == head[:, :-1]) & np.isfinite(head[:, 1:])
        rows = np.flatnonzero(tie.any(axis=1))
        if len(rows):
            # exact distance ties (symmetric structures): order them by neighbour index, then (two images
            # of one atom at the same distance) by the pair vector's x, y, z: never by the list's order
            safe = np.maximum(ppad[rows], 0)
            jpad = np.where(ppad[rows] >= 0, nl.j[safe], -1)
            Dpad = np.take(nl.D, safe, axis=0)  # (rows, width, 3); padding sorts last by its inf distance
            order = np.lexsort((Dpad[..., 2], Dpad[..., 1], Dpad[..., 0], jpad, dpad[rows]), axis=-1)
            psort[rows] = np.take_along_axis(ppad[rows], order, axis=1)
        w = min(width, int(sel[t]))
        pair[:, offset[t] : offset[t] + w] = psort[:, :w]
        n_dropped += np.maximum(counts - sel[t], 0)

    mask = pair >= 0
    safe = np.where(mask, pair, 0)
    rij = np.take(nl.D, safe, axis=0)  # (n, nslot, 3); np.take is much faster than fancy indexing here
    rij *= mask[..., None]
    r = np.take(nl.d, safe) * mask  # (n, nslot)
    return Slots(pair, rij, r, mask, n_dropped)
