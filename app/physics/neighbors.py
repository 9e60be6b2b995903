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

__all__ = ["NeighborList", "neighbor_list", "estimate_neighbours", "closest_pair"]


@dataclass(frozen=True)
class NeighborList:
    """Pairs sorted by centre ``i`` (in no particular order within a centre: vesin leaves it unspecified;
    :func:`app.physics.environment.build_slots` sorts each centre's neighbours itself).
    Shapes: i, j (P,); S (P, 3) int; D (P, 3); d (P,)."""

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
    box, periodic = _vesin_geometry(positions, cell, pbc, cutoff)
    # Grouping the pairs by centre ourselves (one stable argsort of i, then np.take) is cheaper than
    # vesin's sorted=True, and the copies we make anyway replace vesin's own (copy=False).
    calc = vesin.NeighborList(cutoff=float(cutoff), full_list=True, sorted=False)
    i, j, S, D, d = calc.compute(points=positions, box=box, periodic=periodic, quantities="ijSDd", copy=False)
    i = i.view(np.int64) if i.dtype == np.uint64 else i.astype(np.int64)
    j = j.view(np.int64) if j.dtype == np.uint64 else j.astype(np.int64)
    order = np.argsort(i, kind="stable")
    return NeighborList(
        np.take(i, order),
        np.take(j, order),
        np.take(S, order, axis=0).astype(np.int64),
        np.take(D, order, axis=0),
        np.take(d, order),
    )


def _vesin_geometry(positions, cell, pbc, cutoff):
    """vesin's ``box`` and ``periodic`` arguments for checked inputs (see :func:`_check_inputs`)."""
    if not pbc.any():
        return np.zeros((3, 3)), False
    box = cell if pbc.all() else _box_for_mixed_pbc(positions, cell, pbc, cutoff)
    return box, [bool(p) for p in pbc]


_SMALL_CELL_MAX = 512  # periodic cells up to this many atoms (planes > 2 cutoffs apart): all pairs, no cell list


def _plane_spacings(box: np.ndarray) -> np.ndarray:
    """(3,) distances between neighbouring lattice planes of a non-degenerate box: V / |a_j x a_k|."""
    return abs(np.linalg.det(box)) / np.linalg.norm(np.cross(box[[1, 2, 0]], box[[2, 0, 1]]), axis=1)


def _small_cell(cell, pbc, cutoff: float) -> bool:
    """Whether :func:`_small_cell_pairs` applies: periodic in all three directions, every lattice plane
    spacing more than twice the cutoff."""
    return bool(pbc.all() and (_plane_spacings(cell) > 2.0 * cutoff).all())


_PROBE = 2.0  # Angstrom: smallest cutoff closest_pair asks vesin for
_DENSE_MAX = 256  # isolated frames up to this many atoms: dense distance matrix (guards are then exact)


def _dense_distances(positions: np.ndarray) -> np.ndarray:
    """(N, N) distances of an isolated frame."""
    diff = positions[:, None, :] - positions[None, :, :]  # (N, N, 3)
    return np.sqrt(np.einsum("ijx,ijx->ij", diff, diff))


_COMPILED: dict = {}  # name -> kernel or None, resolved on first use (kernels imports this module)


def _compiled(name: str):
    """app.physics.kernels.<name>, or None without numba (the numpy or vesin path then serves); looked up
    once, not on every request."""
    if name not in _COMPILED:
        try:
            from app.physics import kernels
        except ImportError:
            kernels = None
        _COMPILED[name] = getattr(kernels, name, None)
    return _COMPILED[name]


def _closest_dense():
    return _compiled("closest_dense")


def _small_cell_scan(positions, cell, pbc, cutoff, reach=None):
    """kernels.small_cell_scan's (pairs closer than cutoff, i, j, closest distance) for a small periodic
    cell (see :func:`_small_cell`; planes more than 2 * ``reach`` apart, by default the cutoff), or None
    where it does not apply."""
    if len(positions) > _SMALL_CELL_MAX or not _small_cell(cell, pbc, cutoff if reach is None else reach):
        return None
    scan = _compiled("small_cell_scan")
    if scan is None:
        return None
    frac = positions @ np.linalg.inv(cell)
    count, i, j, d = scan(positions, cell, frac, float(cutoff))
    return int(count), int(i), int(j), float(d)


def closest_pair(positions, cell=None, pbc=None, within: float = 0.1) -> tuple[int, int, float] | None:
    """The closest pair ``(i, j, d)`` with distance ``d < within`` (Angstrom), or None if there is none.

    ``i == j`` means an atom and one of its own periodic images (a cell narrower than ``within``). Cheap for
    a small ``within``: only pairs closer than it are ever formed (call :func:`estimate_neighbours` first on
    untrusted input, so that a pile of atoms cannot produce N^2 of them).
    """
    positions, cell, pbc = _check_inputs(positions, cell, pbc, within)
    if len(positions) == 0:
        return None
    if not pbc.any() and len(positions) <= _DENSE_MAX:  # small molecule: all distances, faster than a cell list
        fast = _closest_dense()
        if fast is not None:  # one compiled loop: numpy's temporaries took 10% of the event loop under small requests
            i, j, d = fast(np.ascontiguousarray(positions, dtype=np.float64))
            return (int(i), int(j), float(d)) if d < within else None
        d = _dense_distances(positions)
        np.fill_diagonal(d, np.inf)
        i, j = np.unravel_index(int(np.argmin(d)), d.shape)
        return (int(min(i, j)), int(max(i, j)), float(d[i, j])) if d[i, j] < within else None
    scan = _small_cell_scan(positions, cell, pbc, within)
    if scan is not None:  # small periodic cell: the minimum image is the only one within reach
        _, i, j, d = scan
        return (i, j, d) if d < within else None
    if not pbc.any():
        box, periodic = np.zeros((3, 3)), False
    else:
        box = cell if pbc.all() else _box_for_mixed_pbc(positions, cell, pbc, within)
        periodic = [bool(p) for p in pbc]
    # vesin's cell list has cells about as wide as its cutoff: a tiny cutoff means millions of cells (24 ms
    # for 192 atoms at 0.1 A), so search up to _PROBE and filter (a few pairs per atom at liquid density)
    calc = vesin.NeighborList(cutoff=max(float(within), _PROBE), full_list=False)
    i, j, d = calc.compute(points=positions, box=box, periodic=periodic, quantities="ijd")
    if len(d) == 0:
        return None
    k = int(np.argmin(d))
    return (int(i[k]), int(j[k]), float(d[k])) if d[k] < within else None


def small_cell_screen(positions, cell, pbc, cutoff: float, within: float):
    """(:func:`estimate_neighbours` at ``cutoff``, :func:`closest_pair` at ``within``) of a small periodic
    cell from one compiled pass over its pairs, exact, as request validation asks for both (192-atom water:
    one pass instead of a density estimate and a vesin search); None where that does not apply (then call
    the two, the estimate first)."""
    checked, c, p = _check_inputs(positions, cell, pbc, max(cutoff, within))
    # counted at the cutoff; the closest pair (over all pairs) is exact if within < half the plane spacing too
    scan = _small_cell_scan(checked, c, p, cutoff, reach=max(cutoff, within)) if len(checked) > 1 else None
    if scan is None:
        return None
    count, i, j, d = scan
    return (2.0 * count + len(checked)) / len(checked), ((i, j, d) if d < within else None)


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


_BIN_BITS = 21  # bits per bin index in the packed bin key (3 x 21 = 63)
_BIN_MAX = (1 << (_BIN_BITS - 1)) - 1


def estimate_neighbours(positions, cell=None, pbc=None, cutoff: float = 6.0) -> float:
    """Mean number of neighbours per atom within ``cutoff``, estimated in O(N) without building any pair.

    Guards :func:`neighbor_list` against inputs whose pair list would not fit in memory (atoms piled up,
    positions in the wrong unit, a cell far too small). Atoms are binned in cells of width >= ``cutoff``
    along each lattice plane normal (Cartesian cubes of side ``cutoff`` for an isolated system). For the
    atoms of bin b, with ``sphere = (4/3) pi cutoff^3``::

        smooth_b = (atoms in the 3 x 3 x 3 bins around b) / (their volume) * sphere
        own_b    = min(count_b / (volume of b) * sphere, atoms in the 3 x 3 x 3 bins around b)
        estimate = sum_b count_b * max(smooth_b, own_b) / N

    The window count caps ``own_b`` because every neighbour of an atom lies in the bins around its own
    (dropped when a periodic direction has fewer than 3 bins: periodic images then count too). The estimate
    is exact for a uniform density, including the images of a cell smaller than the cutoff, and within a
    small factor of the truth for clusters, surfaces and piles of atoms.
    """
    positions, cell, pbc = _check_inputs(positions, cell, pbc, cutoff)
    n = len(positions)
    if n == 0:
        return 0.0
    if not pbc.any() and n <= _DENSE_MAX:  # small isolated frame: the exact count (self included, as below)
        return float(np.count_nonzero(_dense_distances(positions) < cutoff)) / n
    scan = _small_cell_scan(positions, cell, pbc, cutoff)
    if scan is not None:  # small periodic cell: the exact count, each pair once by its minimum image
        return (2.0 * scan[0] + n) / n
    if not pbc.any():
        box = np.eye(3) * cutoff
    elif pbc.all():
        box = cell
    else:
        box = _box_for_mixed_pbc(positions, cell, pbc, cutoff)
    volume = abs(np.linalg.det(box))
    widths = _plane_spacings(box)
    frac = positions @ np.linalg.inv(box)  # (N, 3)
    nbins = np.ones(3, dtype=np.int64)
    frac_bin_volume = 1.0
    window = []
    bins = np.empty((n, 3), dtype=np.int64)
    for k in range(3):
        if pbc[k]:
            nbins[k] = int(min(max(widths[k] // cutoff, 1), _BIN_MAX))
            s = frac[:, k] - np.floor(frac[:, k])
            bins[:, k] = np.minimum((s * nbins[k]).astype(np.int64), nbins[k] - 1)
            frac_bin_volume /= nbins[k]
            window.append(sorted({o % nbins[k] if nbins[k] < 3 else o for o in (-1, 0, 1)}))
        else:
            bins[:, k] = np.clip(np.floor(frac[:, k] * widths[k] / cutoff), -_BIN_MAX, _BIN_MAX)
            frac_bin_volume *= cutoff / widths[k]
            window.append([-1, 0, 1])

    def key(b):
        b = b + _BIN_MAX + 1
        return (b[:, 0] << (2 * _BIN_BITS)) | (b[:, 1] << _BIN_BITS) | b[:, 2]

    ukeys, first, counts = np.unique(key(bins), return_index=True, return_counts=True)
    ubins = bins[first]  # (U, 3)
    offsets = np.array(np.meshgrid(*window, indexing="ij")).reshape(3, -1).T  # (W, 3)
    nb = ubins[:, None, :] + offsets[None, :, :]  # (U, W, 3) bins around each occupied bin
    for k in range(3):
        if pbc[k]:
            nb[..., k] %= nbins[k]
        else:
            np.clip(nb[..., k], -_BIN_MAX, _BIN_MAX, out=nb[..., k])
    nk = key(nb.reshape(-1, 3))
    pos = np.minimum(np.searchsorted(ukeys, nk), len(ukeys) - 1)
    around = np.where(ukeys[pos] == nk, counts[pos], 0).reshape(len(ukeys), -1).sum(1).astype(np.float64)  # (U,)
    bin_volume = volume * frac_bin_volume
    sphere = 4.0 / 3.0 * np.pi * cutoff**3
    smooth = around / (bin_volume * np.prod([len(w) for w in window])) * sphere  # (U,)
    own = counts / bin_volume * sphere  # (U,)
    if not any(pbc[k] and nbins[k] < 3 for k in range(3)):
        own = np.minimum(own, around)
    return float(np.sum(counts * np.maximum(smooth, own)) / n)
