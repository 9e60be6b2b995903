"""Neighbour lists, on top of vesin (ASE-compatible names: ``i``, ``j``, ``S``, ``D``, ``d``).

A pair (i, j, S) means atom j, shifted by the integer cell vector S, lies within ``cutoff`` of atom i::

    D = positions[j] + S @ cell - positions[i]        d = |D| < cutoff

The list is *full* (both (i, j) and (j, i) appear) and contains periodic images of the same atom, including
atom i's own images when the cell is smaller than the cutoff. Cost is linear in the number of atoms.

Isolated systems (``cell is None`` or no periodic direction) are handled by vesin with periodic=False. Any
triclinic cell and any combination of periodic directions is supported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import vesin

__all__ = ["NeighborList", "neighbor_list"]


@dataclass(frozen=True)
class NeighborList:
    """Pairs sorted by centre ``i`` (then ``j``). Shapes: i, j (P,); S (P, 3) int; D (P, 3); d (P,)."""

    i: np.ndarray
    j: np.ndarray
    S: np.ndarray
    D: np.ndarray
    d: np.ndarray

    def __len__(self) -> int:
        return len(self.i)


def _check_inputs(positions, cell, pbc, cutoff):
    positions = np.ascontiguousarray(positions, dtype=np.float64)
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise ValueError(f"positions must have shape (N, 3), got {positions.shape}")
    if not np.isfinite(positions).all():
        raise ValueError("positions must be finite")
    if not (np.isfinite(cutoff) and cutoff > 0):
        raise ValueError(f"cutoff must be a positive finite number, got {cutoff}")
    if cell is None:
        return positions, np.zeros((3, 3)), np.zeros(3, dtype=bool)
    cell = np.ascontiguousarray(cell, dtype=np.float64)
    if cell.shape != (3, 3):
        raise ValueError(f"cell must have shape (3, 3) (lattice vectors as rows), got {cell.shape}")
    if pbc is None:
        pbc = (True, True, True)
    pbc = np.asarray(pbc, dtype=bool).reshape(-1)
    if pbc.shape != (3,):
        raise ValueError(f"pbc must be three booleans, got {pbc.shape[0]} values")
    if pbc.all() and abs(np.linalg.det(cell)) < 1e-12:
        raise ValueError("cell is singular: its three lattice vectors must be linearly independent")
    if pbc.any() and not pbc.all():
        # only the periodic lattice vectors must be independent; an open direction's row may be zero
        periodic = cell[pbc]
        if abs(np.linalg.det(periodic @ periodic.T)) < 1e-24:
            raise ValueError("cell is singular: its periodic lattice vectors must be linearly independent")
    return positions, cell, pbc


def neighbor_list(positions, cell=None, pbc=None, cutoff: float = 6.0) -> NeighborList:
    """Full neighbour list within ``cutoff`` (Angstrom).

    ``positions`` (N, 3) Cartesian; ``cell`` (3, 3) with lattice vectors as rows, or None for an isolated
    system; ``pbc`` three booleans (default: all periodic when a cell is given).
    """
    positions, cell, pbc = _check_inputs(positions, cell, pbc, cutoff)
    n = len(positions)
    if n == 0:
        z = np.zeros(0, dtype=np.int64)
        return NeighborList(z, z, np.zeros((0, 3), np.int64), np.zeros((0, 3)), np.zeros(0))
    if not pbc.any():
        box = np.zeros((3, 3))
        periodic = False
    else:
        box = cell
        periodic = [bool(p) for p in pbc]
        if not pbc.all():
            box = _box_for_mixed_pbc(positions, cell, pbc, cutoff)
    calc = vesin.NeighborList(cutoff=float(cutoff), full_list=True, sorted=True)
    i, j, S, D, d = calc.compute(points=positions, box=box, periodic=periodic, quantities="ijSDd")
    return NeighborList(
        i.astype(np.int64, copy=False),
        j.astype(np.int64, copy=False),
        S.astype(np.int64, copy=False),
        D,
        d,
    )


def _box_for_mixed_pbc(positions, cell, pbc, cutoff):
    """vesin needs a non-degenerate box even along open directions; the shifts it returns along an open
    direction are always zero, so the cell vector there only has to be non-degenerate. An all-zero row
    (allowed by ASE for open directions) is replaced by a vector orthogonal to the periodic ones."""
    box = cell.copy()
    for k in range(3):
        if not pbc[k] and np.linalg.norm(box[k]) < 1e-12:
            others = [box[m] for m in range(3) if m != k]
            v = np.cross(others[0], others[1])
            if np.linalg.norm(v) < 1e-12:
                v = np.eye(3)[k]
            extent = np.ptp(positions, axis=0).max() + 2 * cutoff + 1.0
            box[k] = v / np.linalg.norm(v) * extent
    if abs(np.linalg.det(box)) < 1e-12:
        raise ValueError("cell is degenerate: lattice vectors must be linearly independent")
    return box
