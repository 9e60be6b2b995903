"""Compressed se_e2_a: the embedding networks tabulated, fused with the descriptor contraction (numba).

A full se_e2_a graph spends most of its time in the embedding networks, evaluated on every neighbour slot
(192 water atoms x 138 slots = 26 496 rows through 1 -> 25 -> 50 -> 100). deepmd-kit's ``dp compress``
replaces each embedding network G(x) of one scalar input by a piecewise quintic polynomial. This module
does the same at model load time, from the embedding weights the export writes next to the graph
(``embedding.npz``):

* On a uniform grid of ``x`` (the normalised s(r) column) with ``stride``, G, G' and G'' are computed
  exactly (float64 forward-mode through the tanh layers); on each interval the quintic matching value,
  first and second derivative at both ends is stored (C2 across nodes). Beyond ``x_max`` (atoms closer
  than ``r_min``) G continues linearly from its value and slope at ``x_max``.
* One numba kernel per direction, parallel over centre atoms, skipping empty slots:
  forward  T = G^T R / nslot (M1 x 4, held transposed), D = T T_<^T (M1 x M2), flattened as the fitting graph's input;
  backward from dE/dD to dE/dR through the same polynomial and its derivative.
* The fitting networks run in onnxruntime (``fitting.onnx``: inputs ``d{t}`` (n, M1*M2), outputs the
  atomic energies and dE/dd).

So the interface of :meth:`DeepPotModel.run_network` is unchanged (environment rows in, atomic energies
and dE/dR out), forces remain exactly -dE/dr of the energy the compressed model returns, and the largest
difference between the tabulated and the exact embedding is measured at load time on every interval's
midpoint (``table_error``); tests compare compressed and full graphs end to end.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
from numba import njit, prange

from app.physics.kernels import _lock, _threads

__all__ = ["EmbeddingTable", "CompressedSeA", "embedding_forward", "quintic_coefficients"]

log = logging.getLogger(__name__)


# -- the exact embedding network (numpy, float64) --------------------------------------------------------


def embedding_forward(layers: list[dict], x: np.ndarray):
    """G, dG/dx, d2G/dx2 of one embedding network at points x (k,): each (k, M1).

    ``layers``: [{"w": (out, in), "b": (out,), "kind": "plain" | "same" | "double"}] (training.model.MLP).
    """
    x = np.asarray(x, dtype=np.float64)
    h = x[:, None]
    d1 = np.ones_like(h)
    d2 = np.zeros_like(h)
    for layer in layers:
        w, b, kind = layer["w"], layer["b"], layer["kind"]
        z = h @ w.T + b
        z1 = d1 @ w.T
        z2 = d2 @ w.T
        a = np.tanh(z)
        s = 1.0 - a * a
        a1 = s * z1
        a2 = s * z2 - 2.0 * a * a1 * z1
        if kind == "same":
            h, d1, d2 = a + h, a1 + d1, a2 + d2
        elif kind == "double":
            h = a + np.concatenate([h, h], axis=1)
            d1 = a1 + np.concatenate([d1, d1], axis=1)
            d2 = a2 + np.concatenate([d2, d2], axis=1)
        else:
            h, d1, d2 = a, a1, a2
    return h, d1, d2


def quintic_coefficients(y0, d0, s0, y1, d1, s1, h: float) -> np.ndarray:
    """Coefficients c0..c5 (6, ...) of p(u) = sum c_k u^k on [0, h] with p, p', p'' equal to (y, d, s) at
    both ends (each argument an array of the same shape)."""
    h2, h3 = h * h, h * h * h
    dy = y1 - y0
    c3 = (20.0 * dy - (8.0 * d1 + 12.0 * d0) * h - (3.0 * s0 - s1) * h2) / (2.0 * h3)
    c4 = (-30.0 * dy + (14.0 * d1 + 16.0 * d0) * h + (3.0 * s0 - 2.0 * s1) * h2) / (2.0 * h3 * h)
    c5 = (12.0 * dy - 6.0 * (d1 + d0) * h - (s0 - s1) * h2) / (2.0 * h3 * h2)
    return np.stack([y0, d0, 0.5 * s0, c3, c4, c5])


class EmbeddingTable:
    """Quintic tables of every neighbour element's embedding network on [0, x_max] with one stride."""

    def __init__(self, layers_per_type: list[list[dict]], x_max: np.ndarray, stride: float):
        self.stride = float(stride)
        self.ntypes = len(layers_per_type)
        self.x_max_requested = np.asarray(x_max, dtype=np.float64)
        nbins = int(math.ceil(float(self.x_max_requested.max()) / self.stride))
        self.nbins = max(nbins, 1)
        self.x_max = self.nbins * self.stride  # one grid for all elements
        nodes = np.arange(self.nbins + 1) * self.stride
        m1 = layers_per_type[0][-1]["w"].shape[0]
        self.m1 = m1
        coef = np.empty((self.ntypes, self.nbins, 6, m1))
        g_end = np.empty((self.ntypes, m1))
        dg_end = np.empty((self.ntypes, m1))
        err = 0.0
        for t, layers in enumerate(layers_per_type):
            y, d, s = embedding_forward(layers, nodes)
            c = quintic_coefficients(y[:-1], d[:-1], s[:-1], y[1:], d[1:], s[1:], self.stride)  # (6, nbins, m1)
            coef[t] = np.transpose(c, (1, 0, 2))
            g_end[t], dg_end[t] = y[-1], d[-1]
            mid = nodes[:-1] + 0.5 * self.stride
            exact, exact_d, _ = embedding_forward(layers, mid)
            approx, approx_d = _eval_poly(coef[t], np.full(len(mid), 0.5 * self.stride), np.arange(self.nbins))
            scale = max(1.0, float(np.abs(exact).max()))
            err = max(err, float(np.abs(approx - exact).max()) / scale,
                      float(np.abs(approx_d - exact_d).max()) / max(1.0, float(np.abs(exact_d).max())))
        self.coef = np.ascontiguousarray(coef)
        self.g_end = g_end
        self.dg_end = dg_end
        self.max_rel_error = err  # largest |table - exact| over interval midpoints, relative to max |G| (or |G'|)

    def evaluate(self, t: int, x: np.ndarray):
        """G and dG/dx of element t's table at points x (for tests)."""
        x = np.asarray(x, dtype=np.float64)
        b = np.minimum((x / self.stride).astype(np.int64), self.nbins - 1)
        inside = x < self.x_max
        g, dg = _eval_poly(self.coef[t], x - b * self.stride, b)
        over = ~inside
        if over.any():
            g[over] = self.g_end[t] + self.dg_end[t] * (x[over] - self.x_max)[:, None]
            dg[over] = self.dg_end[t]
        return g, dg


def _eval_poly(coef_t, u, b):
    c = coef_t[b]  # (k, 6, m1)
    u = u[:, None]
    g = c[:, 5]
    dg = 5.0 * c[:, 5]
    for k in (4, 3, 2, 1):
        g = g * u + c[:, k]
        dg = dg * u + k * c[:, k]
    g = g * u + c[:, 0]
    return g, dg


# -- numba kernels --------------------------------------------------------------------------------------


# fastmath lets LLVM vectorise the sums over the M1 channels (reassociation); every atom's arithmetic is
# still the same sequence whatever it is batched with, so results stay batch-invariant and deterministic.
_FAST = {"reassoc", "contract", "nsz", "arcp"}


@njit(inline="always", cache=True)
def _slot(R, std, i, k, coef, tt, inv_h, stride, nbins):
    """Normalised row (x, r1, r2, r3) of slot k of atom i, the offset u of x in its table bin, and that bin's
    six coefficient rows c0..c5 (each (M1,)) of neighbour element tt."""
    x = R[i, k, 0] / std[k, 0]
    b = min(int(x * inv_h), nbins - 1)
    cb = coef[tt, b]
    return (x, R[i, k, 1] / std[k, 1], R[i, k, 2] / std[k, 2], R[i, k, 3] / std[k, 3], x - b * stride,
            cb[0], cb[1], cb[2], cb[3], cb[4], cb[5])


@njit(parallel=True, cache=True, nogil=True, fastmath=_FAST)  # nogil: the event loop runs meanwhile
def _tab_forward(R, std, slot_type, coef, g_end, dg_end, stride, x_max, inv_nslot, m2, T, D):
    """R (n, nslot, 4) raw environment rows -> T (n, 4, M1) (= (G^T R / nslot)^T), D (n, M1*M2)."""
    n, nslot, _ = R.shape
    nbins = coef.shape[1]
    m1 = coef.shape[3]
    inv_h = 1.0 / stride
    for i in prange(n):
        Ti = T[i]
        Ti[:, :] = 0.0
        T0 = Ti[0]
        T1 = Ti[1]
        T2 = Ti[2]
        T3 = Ti[3]
        for k in range(nslot):
            s = R[i, k, 0]
            if s == 0.0:
                continue
            tt = slot_type[k]
            x, r1, r2, r3, u, c0, c1, c2, c3, c4, c5 = _slot(R, std, i, k, coef, tt, inv_h, stride, nbins)
            if x < x_max:
                for m in range(m1):
                    g = ((((c5[m] * u + c4[m]) * u + c3[m]) * u + c2[m]) * u + c1[m]) * u + c0[m]
                    T0[m] += g * x
                    T1[m] += g * r1
                    T2[m] += g * r2
                    T3[m] += g * r3
            else:
                dx = x - x_max
                ge = g_end[tt]
                de = dg_end[tt]
                for m in range(m1):
                    g = ge[m] + de[m] * dx
                    T0[m] += g * x
                    T1[m] += g * r1
                    T2[m] += g * r2
                    T3[m] += g * r3
        for c in range(4):
            for m in range(m1):
                Ti[c, m] *= inv_nslot
        Di = D[i]
        for m in range(m1):
            for p in range(m2):
                Di[m * m2 + p] = T0[m] * T0[p] + T1[m] * T1[p] + T2[m] * T2[p] + T3[m] * T3[p]


@njit(parallel=True, cache=True, nogil=True, fastmath=_FAST)  # nogil: the event loop runs meanwhile
def _tab_backward(R, std, slot_type, coef, g_end, dg_end, stride, x_max, inv_nslot, m2, T, gD, gR):
    """dE/dD (n, M1*M2) -> dE/dR (n, nslot, 4) (raw rows; empty slots get 0)."""
    n, nslot, _ = R.shape
    nbins = coef.shape[1]
    m1 = coef.shape[3]
    inv_h = 1.0 / stride
    for i in prange(n):
        Ti = T[i]
        gT = np.zeros((4, m1))
        gDi = gD[i]
        # D[m, p] = sum_c T[c, m] T[c, p]: both factors get gD's contraction. The inner loop runs over p,
        # contiguous in gD, T and gT, so it vectorises (the order c-outer, p-inner was 5x slower)
        for m in range(m1):
            base = m * m2
            for c in range(4):
                tcm = Ti[c, m]
                acc = 0.0
                for p in range(m2):
                    gd = gDi[base + p]
                    acc += gd * Ti[c, p]
                    gT[c, p] += gd * tcm
                gT[c, m] += acc
        for c in range(4):
            for m in range(m1):
                gT[c, m] *= inv_nslot
        g0 = gT[0]
        g1 = gT[1]
        g2 = gT[2]
        g3 = gT[3]
        for k in range(nslot):
            s = R[i, k, 0]
            if s == 0.0:
                gR[i, k, 0] = 0.0
                gR[i, k, 1] = 0.0
                gR[i, k, 2] = 0.0
                gR[i, k, 3] = 0.0
                continue
            tt = slot_type[k]
            x, r1, r2, r3, u, c0, c1, c2, c3, c4, c5 = _slot(R, std, i, k, coef, tt, inv_h, stride, nbins)
            a0 = 0.0
            a1 = 0.0
            a2 = 0.0
            a3 = 0.0
            ax = 0.0
            if x < x_max:
                for m in range(m1):
                    g = ((((c5[m] * u + c4[m]) * u + c3[m]) * u + c2[m]) * u + c1[m]) * u + c0[m]
                    dg = (((5.0 * c5[m] * u + 4.0 * c4[m]) * u + 3.0 * c3[m]) * u + 2.0 * c2[m]) * u + c1[m]
                    a0 += g * g0[m]
                    a1 += g * g1[m]
                    a2 += g * g2[m]
                    a3 += g * g3[m]
                    ax += dg * (x * g0[m] + r1 * g1[m] + r2 * g2[m] + r3 * g3[m])
            else:
                dx = x - x_max
                ge = g_end[tt]
                de = dg_end[tt]
                for m in range(m1):
                    g = ge[m] + de[m] * dx
                    a0 += g * g0[m]
                    a1 += g * g1[m]
                    a2 += g * g2[m]
                    a3 += g * g3[m]
                    ax += de[m] * (x * g0[m] + r1 * g1[m] + r2 * g2[m] + r3 * g3[m])
            gR[i, k, 0] = (a0 + ax) / std[k, 0]
            gR[i, k, 1] = a1 / std[k, 1]
            gR[i, k, 2] = a2 / std[k, 2]
            gR[i, k, 3] = a3 / std[k, 3]


_PARALLEL_MIN = 64  # centre atoms of one element: fewer run on the calling thread (each costs ~100 slots x M1)


# -- the runner -----------------------------------------------------------------------------------------


class CompressedSeA:
    """Tabulated embeddings (numba) + fitting graph (onnxruntime) with the full graph's interface."""

    def __init__(self, npz_path: Path, fitting_session, input_names, energy_names, grad_names, stride: float,
                 r_min: float, rcut_smth: float, precision=np.float32):
        z = np.load(npz_path, allow_pickle=False)
        self.ntypes = int(z["ntypes"])
        self.sel = [int(s) for s in z["sel"]]
        self.nslot = sum(self.sel)
        self.m1, self.m2 = int(z["m1"]), int(z["m2"])
        self.std = np.ascontiguousarray(z["std"], dtype=np.float64)  # (ntypes, nslot, 4)
        self.slot_type = np.repeat(np.arange(self.ntypes), self.sel).astype(np.int64)
        layers = []
        for tt in range(self.ntypes):
            nl = int(z[f"embed{tt}_nlayers"])
            layers.append([
                {"w": z[f"embed{tt}_w{li}"].astype(np.float64), "b": z[f"embed{tt}_b{li}"].astype(np.float64),
                 "kind": str(z[f"embed{tt}_kind{li}"])}
                for li in range(nl)
            ])
        # the largest embedding input: s(r_min) = 1/r_min (r_min below rcut_smth) over the smallest std
        s_max = 1.0 / min(r_min, rcut_smth)
        x_max = np.array([s_max / self.std[:, self.slot_type == tt, 0].min() for tt in range(self.ntypes)])
        self.table = EmbeddingTable(layers, x_max, stride)
        self.r_min = r_min
        self.session = fitting_session
        self.input_names, self.energy_names, self.grad_names = input_names, energy_names, grad_names
        self.precision = precision

    def warmup(self) -> None:
        """Compile (or load from numba's cache) the kernels now, not on the first request."""
        for n in (1, _PARALLEL_MIN):  # both thread settings
            R = np.zeros((n, self.nslot, 4))
            R[:, 0] = (0.5 * self.std[0, 0, 0], 0.1, 0.1, 0.1)
            self.run([R] * self.ntypes, [n] * self.ntypes)

    def info(self) -> dict:
        return {"stride": self.table.stride, "x_max": self.table.x_max, "bins": self.table.nbins,
                "r_min_A": self.r_min, "table_max_rel_error": self.table.max_rel_error}

    def descriptors(self, t: int, R: np.ndarray):
        """(R, T, D) of centre element t's rows R (n, nslot, 4); D in the fitting graph's precision (the
        kernel computes in float64 and rounds once, when storing)."""
        R = np.ascontiguousarray(R, dtype=np.float64)
        n = len(R)
        T = np.empty((n, 4, self.m1))
        D = np.empty((n, self.m1 * self.m2), dtype=self.precision)
        tb = self.table
        with _threads(n, _PARALLEL_MIN), _lock():  # small inputs on the calling thread alone (as app.physics.kernels)
            _tab_forward(R, self.std[t], self.slot_type, tb.coef, tb.g_end, tb.dg_end, tb.stride, tb.x_max,
                         1.0 / self.nslot, self.m2, T, D)
        return R, T, D

    def run(self, xs: list[np.ndarray], counts: list[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per element rows (n_t, nslot, 4) (``counts`` real rows each) -> atomic energies, dE/dR."""
        keep = []
        feeds = {}
        for t, name in enumerate(self.input_names):
            R, T, D = self.descriptors(t, xs[t])
            keep.append((R, T))
            feeds[name] = D
        outs = self.session.run(self.energy_names + self.grad_names, feeds)
        nt = self.ntypes
        tb = self.table
        es, gs = [], []
        for t in range(nt):
            R, T = keep[t]
            gD = np.ascontiguousarray(outs[nt + t])  # the graph's precision: the kernel widens each element
            gR = np.empty_like(R)
            with _threads(len(R), _PARALLEL_MIN), _lock():
                _tab_backward(R, self.std[t], self.slot_type, tb.coef, tb.g_end, tb.dg_end, tb.stride, tb.x_max,
                              1.0 / self.nslot, self.m2, T, gD, gR)
            es.append(np.asarray(outs[t]).reshape(-1)[: counts[t]])
            gs.append(gR[: counts[t]])
        return es, gs
