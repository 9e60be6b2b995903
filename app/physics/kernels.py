"""Numba kernels of the serving hot path: neighbour slots, both descriptors' environments, and the
vector-Jacobian product fused with the force and virial assembly.

The numpy code in :mod:`app.physics.environment`, :mod:`app.physics.descriptors` and
:mod:`app.physics.forces` is the reference and stays what training uses (``compute`` + ``jacobian``
blocks). These kernels compute the same numbers (to rounding; tested to 1e-12 relative in
``tests/physics/test_kernels.py``) with one pass over each centre atom's neighbours instead of many
array-wide passes, in parallel over centre atoms, float64 throughout:

1. :func:`pair_list`: vesin's half list (quantities ``ijD``, unsorted: its fastest mode), mirrored and
   grouped by centre with a counting sort. Small systems skip vesin's cell list and check every pair in
   one compiled loop, with the same vectors bit for bit: isolated frames up to ``_DENSE_PAIRS_MAX`` atoms,
   and periodic cells up to ``_SMALL_CELL_MAX`` atoms whose lattice planes are more than two cutoffs apart
   (each pair then has one image within the cutoff, the minimum image in fractional coordinates).
2. :func:`compute` / :func:`chunks`: for each centre atom, its neighbours sorted by (element, distance,
   neighbour index, pair vector) into ``sel`` slots per element (the rest dropped and counted), then
   se_e2_a environment rows, or for loc_frame the axis choice with every fallback of
   :meth:`LocFrame._choose_axes_general`, the local frame and the flat features (the network's input,
   written directly: the environment array of a loc_frame chunk is derived from them on demand).
3. :func:`vjp_assemble`: g = dE/d(network input) -> dE/drij per slot -> F_i += dE/drij, F_j -= dE/drij,
   Xi -= rij (outer) dE/drij, without storing dE/drij (nor any Jacobian). Each thread adds into its own
   force buffer (the first thread into the output), summed at the end, so there are no races.

Which implementation :meth:`DeepPotModel.predict` uses is chosen once, at import of
:mod:`app.physics.backend`, by the environment variable ``DPSERVE_PHYSICS_BACKEND`` (``numba`` or
``numpy``; default: numba when it imports, else numpy).

Kernels are compiled on first use and cached on disk (``cache=True``: next to this file, or in
``NUMBA_CACHE_DIR``); :func:`warmup` compiles (or loads) them all on a tiny system, so that the first
request does not pay for it.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from functools import cached_property

# numba's OpenMP threads wait passively (sleep) between kernels instead of spinning: the service shares
# the cores with onnxruntime and the event loop, and on a busy machine a spinning wait for a descheduled
# partner thread cost ~5 ms per kernel call (192 atoms: 40 us/atom instead of 2). Read by libgomp when
# numba first loads it; a value set by the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numba  # noqa: E402
import numpy as np  # noqa: E402
import vesin  # noqa: E402
from numba import njit, prange  # noqa: E402

from .descriptors import LocFrame, SeA  # noqa: E402
from .environment import Slots  # noqa: E402
from .neighbors import _SMALL_CELL_MAX, _check_inputs, _small_cell, _vesin_geometry  # noqa: E402

__all__ = ["PairList", "FastChunk", "pair_list", "compute", "chunks", "vjp_assemble", "warmup"]

_COLLINEAR_TOL = 1e-6  # the same as app.physics.descriptors
_BLOCK = 32  # centre atoms per parallel work item of the environment kernels
_FORCE_BUFFER_BYTES = 1 << 28  # at most this much memory for per-thread force buffers (then fewer threads)
_PARALLEL_MIN = 1024  # centre atoms: fewer run on the calling thread alone (waking threads costs more)
_JIT = dict(cache=True, nogil=True, fastmath=False)


# ---------------------------------------------------------------------------------------------------------
# neighbour pairs grouped by centre


@dataclass(frozen=True)
class PairList:
    """Full neighbour list grouped by centre: the pairs of atom a are ``start[a] .. start[a + 1]`` (in no
    particular order). ``j`` (P,) neighbour index; ``D`` (P, 3) = r_j + S @ cell - r_a."""

    start: np.ndarray
    j: np.ndarray
    D: np.ndarray

    def __len__(self) -> int:
        return len(self.j)

    @property
    def natoms(self) -> int:
        return len(self.start) - 1


@njit(**_JIT)
def _group_pairs(i, j, D, natoms, js, Ds):
    """Full list grouped by centre from vesin's half list: each pair (i, j, D) also gives (j, i, -D).
    Fills js (2H,) and Ds (2H, 3) and returns start (N + 1,). -D is bit for bit the vector vesin's full
    list has."""
    npairs = i.shape[0]
    start = np.zeros(natoms + 1, np.int64)
    for p in range(npairs):
        start[i[p] + 1] += 1
        start[j[p] + 1] += 1
    for a in range(natoms):
        start[a + 1] += start[a]
    fill = start[:-1].copy()
    for p in range(npairs):
        _put_both(fill, js, Ds, i[p], j[p], D[p, 0], D[p, 1], D[p, 2])
    return start


@njit(**_JIT)
def _put_both(fill, js, Ds, a, b, dx, dy, dz):
    """Pair (a, b, D) into centre a's next slot and (b, a, -D) into centre b's."""
    q = fill[a]
    fill[a] = q + 1
    js[q] = b
    Ds[q, 0], Ds[q, 1], Ds[q, 2] = dx, dy, dz
    q = fill[b]
    fill[b] = q + 1
    js[q] = a
    Ds[q, 0], Ds[q, 1], Ds[q, 2] = -dx, -dy, -dz


@njit(**_JIT)
def _dense_pairs(pos, cutoff):
    """Full pair list of an isolated frame by checking all pairs: D = r_j - r_i, as vesin computes it.
    One pass in centre order into buffers sized for every pair (n <= _DENSE_PAIRS_MAX keeps them small)."""
    n = pos.shape[0]
    c2 = cutoff * cutoff
    start = np.zeros(n + 1, np.int64)
    js = np.empty(n * (n - 1), np.int64)
    Ds = np.empty((n * (n - 1), 3))
    q = 0
    for a in range(n):
        for b in range(n):
            if a != b:
                dx = pos[b, 0] - pos[a, 0]
                dy = pos[b, 1] - pos[a, 1]
                dz = pos[b, 2] - pos[a, 2]
                if dx * dx + dy * dy + dz * dz < c2:
                    js[q] = b
                    Ds[q, 0], Ds[q, 1], Ds[q, 2] = dx, dy, dz
                    q += 1
        start[a + 1] = q
    return start, js[:q].copy(), Ds[:q].copy()


_DENSE_PAIRS_MAX = 64  # isolated frames up to this many atoms: all pairs directly, no cell list


@njit(**_JIT)
def _block_scan(pos, bounds, c2, start, js, Ds, fill):
    """Count (``fill`` False) or write the pairs within each frame of ``bounds``; returns their number."""
    q = 0
    for k in range(len(bounds) - 1):
        for a in range(bounds[k], bounds[k + 1]):
            for b in range(bounds[k], bounds[k + 1]):
                if a != b:
                    dx = pos[b, 0] - pos[a, 0]
                    dy = pos[b, 1] - pos[a, 1]
                    dz = pos[b, 2] - pos[a, 2]
                    if dx * dx + dy * dy + dz * dz < c2:
                        if fill:
                            js[q] = b
                            Ds[q, 0], Ds[q, 1], Ds[q, 2] = dx, dy, dz
                        q += 1
            if fill:
                start[a + 1] = q
    return q


@njit(**_JIT)
def _block_pairs(pos, bounds, cutoff):
    """Full pair list of isolated frames laid side by side (frame k: atoms bounds[k] .. bounds[k + 1]), all
    pairs within each frame and none across, D = r_j - r_i as in :func:`_dense_pairs`. A counting pass
    sizes the buffers exactly."""
    c2 = cutoff * cutoff
    start = np.zeros(pos.shape[0] + 1, np.int64)
    total = _block_scan(pos, bounds, c2, start, np.empty(0, np.int64), np.empty((0, 3)), False)
    js = np.empty(total, np.int64)
    Ds = np.empty((total, 3))
    _block_scan(pos, bounds, c2, start, js, Ds, True)
    return start, js, Ds


def block_pair_list(positions, bounds, cutoff: float = 6.0) -> PairList:
    """:func:`pair_list` of isolated frames laid side by side, when no pair can cross frames (packed
    frames: :mod:`app.inference.packing` spaces them by more than the cutoff): all pairs within each frame,
    no cell list (for 7-atom molecules vesin's cell list over the packed frame cost 16 us per molecule).
    ``bounds`` (m + 1,): frame k is atoms bounds[k] .. bounds[k + 1], covering all atoms."""
    positions, _, _ = _check_inputs(positions, None, None, cutoff)
    bounds = np.ascontiguousarray(bounds, dtype=np.int64)
    if bounds[0] != 0 or bounds[-1] != len(positions) or np.any(np.diff(bounds) < 0):
        raise ValueError(f"bounds must rise from 0 to the {len(positions)} atoms, got {bounds[0]} .. {bounds[-1]}")
    start, js, Ds = _block_pairs(np.ascontiguousarray(positions, dtype=np.float64), bounds, float(cutoff))
    return PairList(start, js, Ds)


@njit(**_JIT)
def _min_image(pos, cell, frac, a, b):
    """r_b - r_a + S @ cell with S = -round(f_b - f_a) (fractional f), formed as vesin forms pair vectors."""
    s0 = -np.round(frac[b, 0] - frac[a, 0])
    s1 = -np.round(frac[b, 1] - frac[a, 1])
    s2 = -np.round(frac[b, 2] - frac[a, 2])
    dx = pos[b, 0] - pos[a, 0] + (s0 * cell[0, 0] + s1 * cell[1, 0] + s2 * cell[2, 0])
    dy = pos[b, 1] - pos[a, 1] + (s0 * cell[0, 1] + s1 * cell[1, 1] + s2 * cell[2, 1])
    dz = pos[b, 2] - pos[a, 2] + (s0 * cell[0, 2] + s1 * cell[1, 2] + s2 * cell[2, 2])
    return dx, dy, dz


@njit(**_JIT)
def _small_cell_pairs(pos, cell, frac, cutoff, hi, hj, hD):
    """Half pair list (a < b) of a cell periodic in all three directions whose lattice planes are all more
    than 2 * cutoff apart, into hi, hj (n (n - 1) / 2,) and hD (n (n - 1) / 2, 3); returns the pair count.
    Then every pair has at most one image within the cutoff, the one whose fractional separation lies in
    [-1/2, 1/2] (any other image is at least half a plane spacing, more than the cutoff, away along some
    direction): D = r_b - r_a + S @ cell with S = -round(f_b - f_a), as vesin forms it."""
    n = pos.shape[0]
    c2 = cutoff * cutoff
    q = 0
    for a in range(n):
        for b in range(a + 1, n):
            dx, dy, dz = _min_image(pos, cell, frac, a, b)
            if dx * dx + dy * dy + dz * dz < c2:
                hi[q] = a
                hj[q] = b
                hD[q, 0], hD[q, 1], hD[q, 2] = dx, dy, dz
                q += 1
    return q


_local = threading.local()


def _calculator(cutoff: float) -> vesin.NeighborList:
    """This thread's vesin calculator for ``cutoff``: reusing it reuses vesin's output buffers (about
    0.5 us/atom of allocation and page faults per call), at the price of keeping the largest list this
    thread has built (40 bytes per pair: 175 MB for the 98304-atom water box at 6 A)."""
    cache = getattr(_local, "calculators", None)
    if cache is None:
        cache = _local.calculators = {}
    calc = cache.get(cutoff)
    if calc is None:
        calc = cache[cutoff] = vesin.NeighborList(cutoff=cutoff, full_list=False, sorted=False)
    return calc


def pair_list(positions, cell=None, pbc=None, cutoff: float = 6.0) -> PairList:
    """The pairs of :func:`app.physics.neighbors.neighbor_list` (same arguments, same checks, the same
    pair vectors bit for bit), grouped by centre, as a :class:`PairList`. vesin's half list (each pair
    once; measured 30% faster than its full list) is mirrored here; the order within a centre is not the
    full list's, which is why the slot order never depends on it (see :mod:`app.physics.environment`)."""
    positions, cell, pbc = _check_inputs(positions, cell, pbc, cutoff)
    n = len(positions)
    if n == 0:
        return PairList(np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros((0, 3)))
    if n <= _DENSE_PAIRS_MAX and not pbc.any():
        # a small isolated molecule: all pairs directly (vesin's call overhead is ~20x this for 7 atoms)
        start, js, Ds = _dense_pairs(np.ascontiguousarray(positions, dtype=np.float64), float(cutoff))
        return PairList(start, js, Ds)
    if n <= _SMALL_CELL_MAX and _small_cell(cell, pbc, cutoff):
        # a small periodic box (192-atom water at 6 A: 2-3x faster than vesin's cell list, same vectors)
        frac = positions @ np.linalg.inv(cell)
        cap = n * (n - 1) // 2  # every pair at most once; np.empty touches only the pages written
        hi, hj, hD = np.empty(cap, np.int64), np.empty(cap, np.int64), np.empty((cap, 3))
        h = _small_cell_pairs(positions, cell, frac, float(cutoff), hi, hj, hD)
        js, Ds = np.empty(2 * h, np.int64), np.empty((2 * h, 3))
        start = _group_pairs(hi[:h], hj[:h], hD[:h], n, js, Ds)
        return PairList(start, js, Ds)
    box, periodic = _vesin_geometry(positions, cell, pbc, cutoff)
    calc = _calculator(float(cutoff))
    i, j, D = calc.compute(points=positions, box=box, periodic=periodic, quantities="ijD", copy=False)
    if len(i) == 0:
        return PairList(np.zeros(n + 1, np.int64), np.zeros(0, np.int64), np.zeros((0, 3)))
    i = i.view(np.int64) if i.dtype == np.uint64 else i.astype(np.int64)
    j = j.view(np.int64) if j.dtype == np.uint64 else j.astype(np.int64)
    # the kernel copies out of vesin's buffers (copy=False: views valid until this thread's next call)
    js = np.empty(2 * len(i), np.int64)  # numpy allocations: huge pages, far fewer page faults
    Ds = np.empty((2 * len(i), 3))
    start = _group_pairs(i, j, np.asarray(D, dtype=np.float64), n, js, Ds)
    return PairList(start, js, Ds)


# ---------------------------------------------------------------------------------------------------------
# slots of one centre atom


@njit(**_JIT)
def _after(p1, p2, js, Ds):
    """At equal distance, pair p1 sorts after pair p2: by neighbour index, then by the pair vector's
    x, y, z (two images of one atom)."""
    if js[p1] != js[p2]:
        return js[p1] > js[p2]
    for e in range(3):
        if Ds[p1, e] != Ds[p2, e]:
            return Ds[p1, e] > Ds[p2, e]
    return False


@njit(**_JIT)
def _select(a, start, js, Ds, types, sel, offset, inv_rc3, row, rrow, scratch, iscratch, cnt, seg):
    """Slots of centre ``a``: ``row`` (nslot,) pair index or -1, ``rrow`` (nslot,) distance (set where
    filled); returns how many neighbours were dropped.

    Sort key (element, d, j, D_x, D_y, D_z), as :func:`app.physics.environment.build_slots`. A bucket sort
    by element and then by (d/rcut)^3 in as many buckets as the element has neighbours here (about one
    per bucket at uniform density), then an insertion sort by the full key per element that only has to
    order the few pairs sharing a bucket. ``scratch`` (2, maxdeg) and ``iscratch`` (4, maxdeg + 1) are
    work space, ``cnt``, ``seg`` (ntypes,).
    """
    ntypes = sel.shape[0]
    p0, p1 = start[a], start[a + 1]
    m = p1 - p0
    dtmp, bd = scratch[0], scratch[1]
    bk, hist, tt, bp = iscratch[0], iscratch[1], iscratch[2], iscratch[3]
    for t in range(ntypes):
        cnt[t] = 0
    for q in range(m):  # element and distance of each pair
        p = p0 + q
        t = types[js[p]]
        tt[q] = t
        cnt[t] += 1
        dx, dy, dz = Ds[p, 0], Ds[p, 1], Ds[p, 2]
        dtmp[q] = np.sqrt(dx * dx + dy * dy + dz * dz)
    s = 0
    for t in range(ntypes):
        seg[t] = s
        s += cnt[t]
    for q in range(m + 1):
        hist[q] = 0
    for q in range(m):  # bucket: element, then (d / rcut)^3 in cnt[t] buckets
        t = tt[q]
        d = dtmp[q]
        nb = cnt[t]
        b = int(d * d * d * inv_rc3 * nb)
        b = seg[t] + min(max(b, 0), nb - 1)
        bk[q] = b
        hist[b + 1] += 1
    for q in range(m):
        hist[q + 1] += hist[q]
    for q in range(m):  # scatter into bucket order
        b = bk[q]
        pos = hist[b]
        hist[b] = pos + 1
        bd[pos] = dtmp[q]
        bp[pos] = p0 + q
    for t in range(ntypes):  # insertion sort by the full key within each element
        lo = seg[t]
        for q0 in range(lo + 1, lo + cnt[t]):
            d, pp = bd[q0], bp[q0]
            q = q0
            while q > lo and (bd[q - 1] > d or (bd[q - 1] == d and _after(bp[q - 1], pp, js, Ds))):
                bd[q] = bd[q - 1]
                bp[q] = bp[q - 1]
                q -= 1
            bd[q] = d
            bp[q] = pp
    dropped = 0
    for t in range(ntypes):
        k0 = offset[t]
        keep = min(cnt[t], sel[t])
        for k in range(keep):
            row[k0 + k] = bp[seg[t] + k]
            rrow[k0 + k] = bd[seg[t] + k]
        for k in range(keep, sel[t]):
            row[k0 + k] = -1
        dropped += cnt[t] - keep
    return dropped


@njit(**_JIT)
def _max_degree(start, c0, c1):
    m = 0
    for a in range(c0, c1):
        m = max(m, start[a + 1] - start[a])
    return m


# ---------------------------------------------------------------------------------------------------------
# se_e2_a


@njit(**_JIT)
def _switch(r, rs, inv_width, dsw_scale):
    """s(r) and s'(r), in the same operations as :meth:`SeA.switch`."""
    u = (r - rs) * inv_width
    u = min(max(u, 0.0), 1.0)
    om = 1.0 - u
    om2 = om * om
    sw = 6.0 * u
    sw += 3.0
    sw *= u
    sw += 1.0
    sw *= om2
    sw *= om  # (1 - u)^3 (1 + 3u + 6u^2)
    dsw = u * u
    dsw *= om2
    dsw *= dsw_scale  # -30 u^2 (1 - u)^2 / (rc - rs)
    inv = 1.0 / r
    s = sw * inv
    ds = dsw * inv - s * inv
    return s, ds


@njit(parallel=True, **_JIT)
def _se_a_env(start, js, Ds, types, c0, sel, offset, rs, rc, pair, ndrop, env):
    """Fill pair (n, nslot), n_dropped (n,), env (n, nslot, 4) of centre atoms c0 .. c0 + n."""
    n, nslot = pair.shape
    maxdeg = _max_degree(start, c0, c0 + n)
    inv_width = 1.0 / (rc - rs)
    dsw_scale = -30.0 / (rc - rs)
    inv_rc3 = 1.0 / (rc * rc * rc)
    nblk = (n + _BLOCK - 1) // _BLOCK
    for b in prange(nblk):
        scratch = np.empty((2, maxdeg))
        iscratch = np.empty((4, maxdeg + 1), np.int64)
        seg = np.empty(sel.shape[0], np.int64)
        cnt = np.empty(sel.shape[0], np.int64)
        rrow = np.empty(nslot)
        for li in range(b * _BLOCK, min(n, (b + 1) * _BLOCK)):
            row = pair[li]
            ndrop[li] = _select(c0 + li, start, js, Ds, types, sel, offset, inv_rc3, row, rrow, scratch, iscratch, cnt, seg)
            for k in range(nslot):
                p = row[k]
                if p < 0:
                    env[li, k, 0] = 0.0
                    env[li, k, 1] = 0.0
                    env[li, k, 2] = 0.0
                    env[li, k, 3] = 0.0
                    continue
                r = rrow[k]
                s, _ = _switch(r, rs, inv_width, dsw_scale)
                t = s * (1.0 / r)
                env[li, k, 0] = s
                env[li, k, 1] = t * Ds[p, 0]
                env[li, k, 2] = t * Ds[p, 1]
                env[li, k, 3] = t * Ds[p, 2]


@njit(parallel=True, **_JIT)
def _se_a_vjp(pair, js, Ds, c0, g, rs, rc, forces, fbuf, vbuf, dedr):
    """dE/drij = rij (g_0 a + b g_xyz . rij) + t g_xyz (as :meth:`SeA.vjp`), added into forces and virial;
    also written to ``dedr`` (n, nslot, 3) unless it is empty. Block b of centre atoms adds its forces
    into ``forces`` (b = 0) or ``fbuf[b - 1]`` and its virial into ``vbuf[b, :9]`` (see :func:`_reduce`)."""
    n, nslot = pair.shape
    nblocks = vbuf.shape[0]
    store = dedr.shape[0] > 0
    inv_width = 1.0 / (rc - rs)
    dsw_scale = -30.0 / (rc - rs)
    for blk in prange(nblocks):
        F = forces if blk == 0 else fbuf[blk - 1]
        v00 = v01 = v02 = v10 = v11 = v12 = v20 = v21 = v22 = 0.0
        for li in range(blk * n // nblocks, (blk + 1) * n // nblocks):
            a = c0 + li
            fa0 = fa1 = fa2 = 0.0
            for k in range(nslot):
                p = pair[li, k]
                if p < 0:
                    if store:
                        dedr[li, k, 0] = 0.0
                        dedr[li, k, 1] = 0.0
                        dedr[li, k, 2] = 0.0
                    continue
                x, y, z = Ds[p, 0], Ds[p, 1], Ds[p, 2]
                r = np.sqrt(x * x + y * y + z * z)
                s, ds = _switch(r, rs, inv_width, dsw_scale)
                inv_r = 1.0 / r
                t = s * inv_r
                ca = ds * inv_r
                cb = (ds - t) * inv_r * inv_r
                g0, g1, g2, g3 = g[li, k, 0], g[li, k, 1], g[li, k, 2], g[li, k, 3]
                coef = g0 * ca + cb * (g1 * x + g2 * y + g3 * z)
                gx = x * coef + g1 * t
                gy = y * coef + g2 * t
                gz = z * coef + g3 * t
                if store:
                    dedr[li, k, 0] = gx
                    dedr[li, k, 1] = gy
                    dedr[li, k, 2] = gz
                fa0 += gx
                fa1 += gy
                fa2 += gz
                jj = js[p]
                F[jj, 0] -= gx
                F[jj, 1] -= gy
                F[jj, 2] -= gz
                v00 -= x * gx
                v01 -= x * gy
                v02 -= x * gz
                v10 -= y * gx
                v11 -= y * gy
                v12 -= y * gz
                v20 -= z * gx
                v21 -= z * gy
                v22 -= z * gz
            F[a, 0] += fa0
            F[a, 1] += fa1
            F[a, 2] += fa2
        vb = vbuf[blk]
        vb[0], vb[1], vb[2], vb[3], vb[4], vb[5], vb[6], vb[7], vb[8] = v00, v01, v02, v10, v11, v12, v20, v21, v22


@njit(**_JIT)
def _reduce(forces, fbuf, virial, vbuf):
    """forces += sum of the per-block force buffers; virial += sum of the per-block virials (serial: a
    parallel region costs more than these few additions)."""
    for a in range(forces.shape[0]):
        for b in range(fbuf.shape[0]):
            forces[a, 0] += fbuf[b, a, 0]
            forces[a, 1] += fbuf[b, a, 1]
            forces[a, 2] += fbuf[b, a, 2]
    for b in range(vbuf.shape[0]):
        for x in range(3):
            for y in range(3):
                virial[x, y] += vbuf[b, 3 * x + y]


# ---------------------------------------------------------------------------------------------------------
# loc_frame


@njit(**_JIT)
def _valid_second(k, a1, row, Ds, ax, ay, az, na):
    """Slot k can be the second axis atom: filled, not the first, not collinear with it."""
    p = row[k]
    if p < 0 or k == a1:
        return False
    bx, by, bz = Ds[p, 0], Ds[p, 1], Ds[p, 2]
    cx = ay * bz - az * by
    cy = az * bx - ax * bz
    cz = ax * by - ay * bx
    cr = np.sqrt(cx * cx + cy * cy + cz * cz)
    nb = np.sqrt(bx * bx + by * by + bz * bz)
    return cr > _COLLINEAR_TOL * max(nb * na, 1e-300)


@njit(**_JIT)
def _next_by_distance(row, rrow, sel, offset, cur):
    """The nearest slot not yet visited (cursors ``cur`` per element; ties: lower slot), or -1.
    Visiting slots this way is the order of a stable argsort of the slots by distance."""
    best = -1
    bestr = 0.0
    for t in range(sel.shape[0]):
        if cur[t] < sel[t]:
            k = offset[t] + cur[t]
            if row[k] >= 0 and (best < 0 or rrow[k] < bestr):
                best = t
                bestr = rrow[k]
    if best < 0:
        return -1
    k = offset[best] + cur[best]
    cur[best] += 1
    return k


@njit(**_JIT)
def _choose_axes(row, rrow, Ds, sel, offset, rule, cur):
    """Slots (a1, a2) of the two axis atoms, -1 where none: the rules of
    :meth:`LocFrame._choose_axes_general` (``rule`` (2, 2): the centre element's [[t_a, rank_a], [t_b, rank_b]])."""
    ntypes = sel.shape[0]
    a1 = -1
    ta, ra = rule[0, 0], rule[0, 1]
    if ra < sel[ta] and row[offset[ta] + ra] >= 0:
        a1 = offset[ta] + ra
    if a1 < 0:
        for t in range(ntypes):
            cur[t] = 0
        a1 = _next_by_distance(row, rrow, sel, offset, cur)  # the nearest neighbour
        if a1 < 0:
            return -1, -1
    p = row[a1]
    ax, ay, az = Ds[p, 0], Ds[p, 1], Ds[p, 2]
    na = np.sqrt(ax * ax + ay * ay + az * az)
    tb, rb = rule[1, 0], rule[1, 1]
    for rank in range(rb, sel[tb]):  # the rule's atom, then the next ranks of its element
        k = offset[tb] + rank
        if _valid_second(k, a1, row, Ds, ax, ay, az, na):
            return a1, k
    for t in range(ntypes):  # then any neighbour, nearest first
        cur[t] = 0
    while True:
        k = _next_by_distance(row, rrow, sel, offset, cur)
        if k < 0:
            return a1, -1
        if _valid_second(k, a1, row, Ds, ax, ay, az, na):
            return a1, k


@njit(**_JIT)
def _frame(a, has2, b, Q):
    """Local frame rows Q (3, 3) = (e_x, e_y, e_z) from axis vectors a and b (b unused without has2);
    returns (la, lu, bex, b) for the derivatives (b: the vector actually used)."""
    la = np.sqrt(a[0] * a[0] + a[1] * a[1] + a[2] * a[2])
    for x in range(3):
        Q[0, x] = a[x] / la
    if not has2:  # one-neighbour frame: the coordinate axis least aligned with e_x (first on ties)
        m = 0
        for x in (1, 2):
            if abs(Q[0, x]) < abs(Q[0, m]):
                m = x
        b = np.zeros(3)
        b[m] = 1.0
    bex = b[0] * Q[0, 0] + b[1] * Q[0, 1] + b[2] * Q[0, 2]
    u0 = b[0] - bex * Q[0, 0]
    u1 = b[1] - bex * Q[0, 1]
    u2 = b[2] - bex * Q[0, 2]
    lu = np.sqrt(u0 * u0 + u1 * u1 + u2 * u2)
    Q[1, 0], Q[1, 1], Q[1, 2] = u0 / lu, u1 / lu, u2 / lu
    Q[2, 0] = Q[0, 1] * Q[1, 2] - Q[0, 2] * Q[1, 1]
    Q[2, 1] = Q[0, 2] * Q[1, 0] - Q[0, 0] * Q[1, 2]
    Q[2, 2] = Q[0, 0] * Q[1, 1] - Q[0, 1] * Q[1, 0]
    return la, lu, bex, b


@njit(parallel=True, **_JIT)
def _loc_frame_env(start, js, Ds, types, c0, sel, offset, rcut, rule, is_a, col, pair, ndrop, axis, feat):
    """Fill pair (n, nslot), n_dropped (n,), axis (n, 2), features (n, dim) of centre atoms c0 .. c0 + n."""
    n, nslot = pair.shape
    ntypes = sel.shape[0]
    maxdeg = _max_degree(start, c0, c0 + n)
    inv_rc3 = 1.0 / (rcut * rcut * rcut)
    nblk = (n + _BLOCK - 1) // _BLOCK
    for blk in prange(nblk):
        scratch = np.empty((2, maxdeg))
        iscratch = np.empty((4, maxdeg + 1), np.int64)
        seg = np.empty(ntypes, np.int64)
        cnt = np.empty(ntypes, np.int64)
        rrow = np.empty(nslot)
        Q = np.zeros((3, 3))
        av = np.empty(3)
        bv = np.empty(3)
        for li in range(blk * _BLOCK, min(n, (blk + 1) * _BLOCK)):
            a = c0 + li
            row = pair[li]
            ndrop[li] = _select(a, start, js, Ds, types, sel, offset, inv_rc3, row, rrow, scratch, iscratch, cnt, seg)
            a1, a2 = _choose_axes(row, rrow, Ds, sel, offset, rule[types[a]], cnt)
            axis[li, 0] = a1
            axis[li, 1] = a2
            if a1 >= 0:
                for e in range(3):
                    av[e] = Ds[row[a1], e]
                    bv[e] = Ds[row[a2], e] if a2 >= 0 else 0.0
                _frame(av, a2 >= 0, bv, Q)
            for k in range(nslot):
                p = row[k]
                c = col[k]
                if not is_a[k]:
                    feat[li, c] = 1.0 / rrow[k] if p >= 0 else 0.0
                    continue
                if p < 0:
                    feat[li, c] = 0.0
                    feat[li, c + 1] = 0.0
                    feat[li, c + 2] = 0.0
                    feat[li, c + 3] = 0.0
                    continue
                r = rrow[k]
                inv_r = 1.0 / r
                w = inv_r / r
                x, y, z = Ds[p, 0], Ds[p, 1], Ds[p, 2]
                feat[li, c] = inv_r
                for m in range(3):
                    feat[li, c + 1 + m] = (x * Q[m, 0] + y * Q[m, 1] + z * Q[m, 2]) * w


@njit(**_JIT)
def _mm3(A, B, out):
    """out = A @ B for 3 x 3 arrays."""
    for c in range(3):
        for y in range(3):
            out[c, y] = A[c, 0] * B[0, y] + A[c, 1] * B[1, y] + A[c, 2] * B[2, y]


@njit(**_JIT)
def _cross_matrix(v, C):
    """C = [v]_x, with [v]_x w = v x w."""
    C[0, 0], C[0, 1], C[0, 2] = 0.0, -v[2], v[1]
    C[1, 0], C[1, 1], C[1, 2] = v[2], 0.0, -v[0]
    C[2, 0], C[2, 1], C[2, 2] = -v[1], v[0], 0.0


@njit(**_JIT)
def _frame_derivatives(Q, la, lu, bex, b, has2, dQa, dQb, work):
    """dQa[m, c, y] = d e_m[c] / d a_y and dQb the same for b (zero without has2), as in
    :meth:`LocFrame.compute`. ``work`` (8, 3, 3) is scratch space."""
    ex = Q[0]
    ey = Q[1]
    dex, Py, dudex, dudb, Cx, Cy, t1, t2 = work[0], work[1], work[2], work[3], work[4], work[5], work[6], work[7]
    for c in range(3):
        for y in range(3):
            dlt = 1.0 if c == y else 0.0
            dex[c, y] = (dlt - ex[c] * ex[y]) / la
            Py[c, y] = (dlt - ey[c] * ey[y]) / lu
            dudex[c, y] = -(ex[c] * b[y]) - bex * dlt
            dudb[c, y] = dlt - ex[c] * ex[y]
    _cross_matrix(ex, Cx)
    _cross_matrix(ey, Cy)
    _mm3(Py, dudex, t1)
    _mm3(t1, dex, t2)  # d e_y / da
    for c in range(3):
        for y in range(3):
            dQa[0, c, y] = dex[c, y]
            dQa[1, c, y] = t2[c, y]
    _mm3(Cx, t2, t1)
    _mm3(Cy, dex, t2)
    for c in range(3):
        for y in range(3):
            dQa[2, c, y] = t1[c, y] - t2[c, y]  # d e_z / da = -[e_y]_x de_x/da + [e_x]_x de_y/da
    _mm3(Py, dudb, t1)  # d e_y / db
    _mm3(Cx, t1, t2)  # d e_z / db
    for c in range(3):
        for y in range(3):
            dQb[0, c, y] = 0.0
            dQb[1, c, y] = t1[c, y] if has2 else 0.0
            dQb[2, c, y] = t2[c, y] if has2 else 0.0


@njit(parallel=True, **_JIT)
def _loc_frame_vjp(pair, axis, js, Ds, c0, g, is_a, col, forces, fbuf, vbuf, dedr):
    """dE/drij from g = dE/d features (n, dim) as :meth:`LocFrame.vjp` (the axis atoms' terms through
    the frame included), added into the forces and virials of the blocks (as :func:`_se_a_vjp`); also
    written to ``dedr`` unless it is empty."""
    n, nslot = pair.shape
    nblocks = vbuf.shape[0]
    store = dedr.shape[0] > 0
    for blk in prange(nblocks):
        F = forces if blk == 0 else fbuf[blk - 1]
        v00 = v01 = v02 = v10 = v11 = v12 = v20 = v21 = v22 = 0.0
        Q = np.zeros((3, 3))
        M = np.empty((3, 3))
        dQ = np.empty((2, 3, 3, 3))
        work = np.empty((8, 3, 3))
        av = np.empty(3)
        bv = np.empty(3)
        for li in range(blk * n // nblocks, (blk + 1) * n // nblocks):
            a = c0 + li
            a1, a2 = axis[li, 0], axis[li, 1]
            if store:
                dedr[li] = 0.0
            if a1 < 0:
                continue  # no neighbour: no force
            for e in range(3):
                av[e] = Ds[pair[li, a1], e]
                bv[e] = Ds[pair[li, a2], e] if a2 >= 0 else 0.0
            la, lu, bex, bused = _frame(av, a2 >= 0, bv, Q)
            M[:] = 0.0
            fa0 = fa1 = fa2 = 0.0
            for k in range(nslot):
                p = pair[li, k]
                if p < 0:
                    continue
                x, y, z = Ds[p, 0], Ds[p, 1], Ds[p, 2]
                r = np.sqrt(x * x + y * y + z * z)
                inv_r = 1.0 / r
                inv_r2 = inv_r / r
                c = col[k]
                g0 = g[li, c]
                # coef = (2 g . env - g_0 / r) / r^2, env = (1/r, q w); gq = g_xyz w (a-slots only)
                ge = g0 * inv_r
                gx = gy = gz = 0.0
                if is_a[k]:
                    q0 = x * Q[0, 0] + y * Q[0, 1] + z * Q[0, 2]
                    q1 = x * Q[1, 0] + y * Q[1, 1] + z * Q[1, 2]
                    q2 = x * Q[2, 0] + y * Q[2, 1] + z * Q[2, 2]
                    gq0 = g[li, c + 1] * inv_r2
                    gq1 = g[li, c + 2] * inv_r2
                    gq2 = g[li, c + 3] * inv_r2
                    ge += gq0 * q0 + gq1 * q1 + gq2 * q2
                    gx = gq0 * Q[0, 0] + gq1 * Q[1, 0] + gq2 * Q[2, 0]
                    gy = gq0 * Q[0, 1] + gq1 * Q[1, 1] + gq2 * Q[2, 1]
                    gz = gq0 * Q[0, 2] + gq1 * Q[1, 2] + gq2 * Q[2, 2]
                    M[0, 0] += gq0 * x
                    M[0, 1] += gq0 * y
                    M[0, 2] += gq0 * z
                    M[1, 0] += gq1 * x
                    M[1, 1] += gq1 * y
                    M[1, 2] += gq1 * z
                    M[2, 0] += gq2 * x
                    M[2, 1] += gq2 * y
                    M[2, 2] += gq2 * z
                coef = (2.0 * ge - g0 * inv_r) * inv_r2
                gx -= x * coef
                gy -= y * coef
                gz -= z * coef
                if store:
                    dedr[li, k, 0] = gx
                    dedr[li, k, 1] = gy
                    dedr[li, k, 2] = gz
                fa0 += gx
                fa1 += gy
                fa2 += gz
                jj = js[p]
                F[jj, 0] -= gx
                F[jj, 1] -= gy
                F[jj, 2] -= gz
                v00 -= x * gx
                v01 -= x * gy
                v02 -= x * gz
                v10 -= y * gx
                v11 -= y * gy
                v12 -= y * gz
                v20 -= z * gx
                v21 -= z * gy
                v22 -= z * gz
            # the frame moves with its two axis atoms: dE/da = sum_(m, x) M[m, x] d e_m[x] / da
            _frame_derivatives(Q, la, lu, bex, bused, a2 >= 0, dQ[0], dQ[1], work)
            for which in range(2):
                k = a1 if which == 0 else a2
                if k < 0:
                    continue
                h0 = h1 = h2 = 0.0
                for m in range(3):
                    for e in range(3):
                        h0 += M[m, e] * dQ[which, m, e, 0]
                        h1 += M[m, e] * dQ[which, m, e, 1]
                        h2 += M[m, e] * dQ[which, m, e, 2]
                p = pair[li, k]
                if store:
                    dedr[li, k, 0] += h0
                    dedr[li, k, 1] += h1
                    dedr[li, k, 2] += h2
                x, y, z = Ds[p, 0], Ds[p, 1], Ds[p, 2]
                fa0 += h0
                fa1 += h1
                fa2 += h2
                jj = js[p]
                F[jj, 0] -= h0
                F[jj, 1] -= h1
                F[jj, 2] -= h2
                v00 -= x * h0
                v01 -= x * h1
                v02 -= x * h2
                v10 -= y * h0
                v11 -= y * h1
                v12 -= y * h2
                v20 -= z * h0
                v21 -= z * h1
                v22 -= z * h2
            F[a, 0] += fa0
            F[a, 1] += fa1
            F[a, 2] += fa2
        vb = vbuf[blk]
        vb[0], vb[1], vb[2], vb[3], vb[4], vb[5], vb[6], vb[7], vb[8] = v00, v01, v02, v10, v11, v12, v20, v21, v22


# ---------------------------------------------------------------------------------------------------------
# the descriptors' fast path


@dataclass
class _Layout:
    """Per-descriptor constant arrays for the kernels."""

    sel: np.ndarray
    offset: np.ndarray
    rule: np.ndarray | None = None
    is_a: np.ndarray | None = None
    col: np.ndarray | None = None
    dim: int = 0


def _layout(desc) -> _Layout:
    cached = getattr(desc, "_kernel_layout", None)
    if cached is not None:
        return cached
    sel = np.ascontiguousarray(desc.sel, dtype=np.int64)
    offset = np.concatenate([[0], np.cumsum(sel)[:-1]]).astype(np.int64)
    if isinstance(desc, LocFrame):
        is_a = np.ascontiguousarray(desc.is_a, dtype=np.bool_)
        # first column of each slot in the flat features: 4 per a-slot, then 1 per r-slot
        col = np.where(is_a, 4 * (np.cumsum(is_a) - 1), 4 * int(is_a.sum()) + np.cumsum(~is_a) - 1).astype(np.int64)
        rule = np.ascontiguousarray(np.asarray(desc.axis_rule, dtype=np.int64).reshape(desc.ntypes, 2, 2))
        lay = _Layout(sel, offset, rule, is_a, col, int(desc.dim))
    elif isinstance(desc, SeA):
        lay = _Layout(sel, offset)
    else:
        raise TypeError(f"no numba kernels for descriptor {type(desc).__name__}")
    desc._kernel_layout = lay
    return lay


class FastChunk:
    """A block of centre atoms [start, stop) of one frame, computed by the kernels.

    ``x`` is the network's input: se_e2_a env (n, nslot, 4), loc_frame flat features (n, dim).
    ``pair`` (n, nslot) indexes the :class:`PairList` (-1: empty slot); ``n_dropped`` (n,);
    ``axis`` (n, 2) the axis slots (loc_frame). ``env`` and ``slots`` (a :class:`Slots`) are built on
    first access, for comparison with the numpy reference.
    """

    def __init__(self, start, stop, pairs, pair, n_dropped, x, axis, descriptor):
        self.start, self.stop = start, stop
        self.pairs = pairs
        self.pair = pair
        self.n_dropped = n_dropped
        self.x = x
        self.axis = axis
        self.descriptor = descriptor

    @cached_property
    def env(self) -> np.ndarray:
        if isinstance(self.descriptor, LocFrame):
            return self.descriptor.features_grad_to_env(self.x)
        return self.x

    @cached_property
    def slots(self) -> Slots:
        mask = self.pair >= 0
        safe = np.where(mask, self.pair, 0)
        if len(self.pairs) == 0:
            rij = np.zeros((*self.pair.shape, 3))
        else:
            rij = np.take(self.pairs.D, safe, axis=0) * mask[..., None]
        r = np.sqrt(np.einsum("nkx,nkx->nk", rij, rij))
        return Slots(self.pair, rij, r, mask, self.n_dropped)


def compute(desc, pairs: PairList, types, centers: slice | None = None) -> FastChunk:
    """The fast counterpart of ``desc.compute(nl, types, centers)``."""
    lay = _layout(desc)
    types = _check_types(types, pairs, len(lay.sel))
    c = centers or slice(0, len(types))
    c0, c1 = int(c.start), int(c.stop)
    if not 0 <= c0 <= c1 <= len(types):
        raise IndexError(f"centre atoms {c0}..{c1} outside 0..{len(types)}")
    n, nslot = c1 - c0, int(lay.sel.sum())
    # outputs allocated by numpy (which asks for transparent huge pages: far fewer page faults)
    pair = np.empty((n, nslot), np.int64)
    ndrop = np.empty(n, np.int64)
    if isinstance(desc, LocFrame):
        axis = np.empty((n, 2), np.int64)
        x = np.empty((n, lay.dim))
        with _lock(), _threads(n):
            _loc_frame_env(pairs.start, pairs.j, pairs.D, types, c0, lay.sel, lay.offset, float(desc.rcut),
                           lay.rule, lay.is_a, lay.col, pair, ndrop, axis, x)
        return FastChunk(c0, c1, pairs, pair, ndrop, x, axis, desc)
    env = np.empty((n, nslot, 4))
    with _lock(), _threads(n):
        _se_a_env(pairs.start, pairs.j, pairs.D, types, c0, lay.sel, lay.offset, float(desc.rcut_smth),
                  float(desc.rcut), pair, ndrop, env)
    return FastChunk(c0, c1, pairs, pair, ndrop, env, None, desc)


def _check_types(types, pairs: PairList, ntypes: int) -> np.ndarray:
    """types as int64, checked (the kernels do not check bounds: a bad index would crash, not raise)."""
    types = np.ascontiguousarray(types, dtype=np.int64)
    if types.shape != (pairs.natoms,):
        raise ValueError(f"types has shape {types.shape}, the pair list is for {pairs.natoms} atoms")
    if len(types) and (types.min() < 0 or types.max() >= ntypes):
        raise IndexError(f"element indices must lie in 0..{ntypes - 1}, got {types.min()}..{types.max()}")
    return types


def chunks(desc, pairs: PairList, types, chunk_size: int | None = None):
    """Yield :class:`FastChunk` for blocks of at most ``chunk_size`` centre atoms (as ``desc.chunks``)."""
    types = _check_types(types, pairs, len(_layout(desc).sel))
    n = len(types)
    step = n if not chunk_size else int(chunk_size)
    for s in range(0, n, max(step, 1)):
        yield compute(desc, pairs, types, slice(s, min(n, s + step)))


_workqueue_lock = threading.Lock()  # numba's workqueue layer (no OpenMP/TBB) must not run kernels concurrently


def vjp_assemble(chunk: FastChunk, g: np.ndarray, forces: np.ndarray, virial: np.ndarray,
                 dEdr: np.ndarray | None = None) -> None:
    """Add the chunk's forces (N, 3) and virial (3, 3) for g = dE/d ``chunk.x`` (same shape), in place;
    with ``dEdr`` (n, nslot, 3) also store dE/drij per slot (as ``desc.vjp`` returns it)."""
    desc = chunk.descriptor
    lay = _layout(desc)
    n = chunk.stop - chunk.start
    if forces.dtype != np.float64 or not forces.flags.c_contiguous or forces.shape[1:] != (3,):
        raise ValueError("forces must be a C-contiguous float64 (N, 3) array")
    if forces.shape[0] != chunk.pairs.natoms:
        raise ValueError(f"forces has {forces.shape[0]} rows, the frame {chunk.pairs.natoms} atoms")
    if virial.dtype != np.float64 or not virial.flags.c_contiguous or virial.shape != (3, 3):
        raise ValueError("virial must be a C-contiguous float64 (3, 3) array")
    g = np.ascontiguousarray(g, dtype=np.float64)
    if g.shape != chunk.x.shape:
        raise ValueError(f"g has shape {g.shape}, the chunk's input {chunk.x.shape}")
    out = np.zeros((0, 0, 3)) if dEdr is None else dEdr
    if dEdr is not None and (dEdr.shape != (*chunk.pair.shape, 3) or not dEdr.flags.c_contiguous):
        raise ValueError("dEdr must be a C-contiguous (n, nslot, 3) float64 array")
    # one force buffer per thread (the first thread adds into ``forces``), within a memory budget; virials
    # 32 doubles apart (no two threads write one cache line)
    nthreads = 1 if n < _PARALLEL_MIN else numba.get_num_threads()
    per_buffer = max(1, forces.shape[0] * 3 * 8)
    nblocks = int(max(1, min(nthreads, n, 1 + _FORCE_BUFFER_BYTES // per_buffer)))
    fbuf = np.zeros((nblocks - 1, forces.shape[0], 3))
    vbuf = np.zeros((nblocks, 32))
    p = chunk.pairs
    with _lock(), _threads(n if nblocks > 1 else 0):
        if isinstance(desc, LocFrame):
            _loc_frame_vjp(chunk.pair, chunk.axis, p.j, p.D, chunk.start, g, lay.is_a, lay.col, forces, fbuf, vbuf, out)
        else:
            _se_a_vjp(chunk.pair, p.j, p.D, chunk.start, g, float(desc.rcut_smth), float(desc.rcut), forces, fbuf,
                      vbuf, out)
        _reduce(forces, fbuf, virial, vbuf)


class _threads:
    """Run the kernels of ``n`` centre atoms on the calling thread alone when n < _PARALLEL_MIN
    (numba's thread count is per calling thread)."""

    def __init__(self, n: int, parallel_min: int = _PARALLEL_MIN):
        self.serial = n < parallel_min
        self.old = 0

    def __enter__(self):
        if self.serial:
            self.old = numba.get_num_threads()
            numba.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        if self.serial:
            numba.set_num_threads(self.old)
        return False


class _NoLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _lock():
    return _workqueue_lock if _threading_layer() == "workqueue" else _NoLock()


_layer: str | None = None


def _threading_layer() -> str | None:
    global _layer
    if _layer is None:
        try:
            _layer = numba.threading_layer()
        except ValueError:  # no parallel kernel has run yet
            return None
    return _layer


_warm = threading.Lock()
_warmed = False


@njit(cache=True, nogil=False, fastmath=False)
def closest_dense(positions):
    """The closest pair (i, j, d), i < j, of an isolated frame by all distances (the first of equal ones in
    row-major order, as numpy's argmin over the distance matrix); d = inf for fewer than two atoms.

    The one kernel that keeps the GIL: it runs on the event loop for every small request and takes
    microseconds; releasing the GIL would hand it to a busy model thread and wait to get it back."""
    n = positions.shape[0]
    best, bi, bj = np.inf, 0, 0
    for i in range(n):
        for j in range(i + 1, n):
            dx = positions[i, 0] - positions[j, 0]
            dy = positions[i, 1] - positions[j, 1]
            dz = positions[i, 2] - positions[j, 2]
            d2 = dx * dx + dy * dy + dz * dz
            if d2 < best:
                best, bi, bj = d2, i, j
    return bi, bj, np.sqrt(best)


@njit(cache=True, nogil=False, fastmath=False)
def small_cell_scan(pos, cell, frac, cutoff):
    """One pass over the pairs of a small periodic cell whose lattice planes are more than 2 * cutoff
    apart (see :func:`_small_cell_pairs`): (number of pairs closer than ``cutoff``, and the closest pair
    (i, j, d), i < j, by minimum image). Keeps the GIL, as :func:`closest_dense`: request validation runs
    it on the event loop."""
    n = pos.shape[0]
    c2 = cutoff * cutoff
    count, best, bi, bj = 0, np.inf, 0, 0
    for a in range(n):
        for b in range(a + 1, n):
            dx, dy, dz = _min_image(pos, cell, frac, a, b)
            d2 = dx * dx + dy * dy + dz * dz
            if d2 < c2:
                count += 1
            if d2 < best:
                best, bi, bj = d2, a, b
    return count, bi, bj, np.sqrt(best)


def warmup() -> None:
    """Compile (or load from the cache) every kernel once per process, on a tiny two-element system."""
    global _warmed
    with _warm:
        if _warmed:
            return
        positions = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0], [3.0, 0.1, 0.2]])
        types = np.array([0, 1, 1, 0])
        pair_list(positions, None, None, 2.5)  # the isolated-molecule path
        block_pair_list(positions, np.array([0, 3, 4]), 2.5)  # packed molecules
        closest_dense(positions)  # request validation of small molecules
        pairs = pair_list(positions, np.eye(3) * 5.0, [True] * 3, 2.5)  # vesin: planes exactly 2 cutoffs apart
        small = np.eye(3) * 6.0  # more than 2 cutoffs: the small-cell pair loop and the validation scan
        pair_list(positions, small, [True] * 3, 2.5)
        small_cell_scan(positions, small, positions @ np.linalg.inv(small), 2.5)
        for desc in (SeA(2.5, 0.5, [2, 4]), LocFrame(2.5, [1, 2], [1, 2], [[[1, 0], [1, 1]], [[0, 0], [1, 0]]])):
            ch = compute(desc, pairs, types)
            forces, virial = np.zeros((len(types), 3)), np.zeros((3, 3))
            vjp_assemble(ch, np.ones_like(ch.x), forces, virial, np.zeros((*ch.pair.shape, 3)))
            vjp_assemble(ch, np.ones_like(ch.x), forces, virial)
        _threading_layer()
        _warmed = True
