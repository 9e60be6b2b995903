"""Deep Potential networks in PyTorch, each returning atomic energies *and* their gradient dE_i/dx_i.

The gradient is written out by hand with plain tensor operations (tanh layers: d tanh = 1 - tanh^2), so

* the very same module exports to ONNX with the gradient inside the graph (ONNX cannot run autograd), and
* training differentiates the force loss through it with ordinary first-order autograd (no double
  backward), which is both faster and identical to what the service computes.

Tests check the hand-written gradient against torch.autograd.

Networks (per centre element t):

* loc_frame: x (n, dim) -> (x - mean_t) / std_t -> fitting MLP (240, 120, 60, 30, 10, tanh) -> linear -> E_i
* se_e2_a: R (n, nslot, 4) -> R / std_t (columns s and xyz; one std for x, y, z keeps rotation
  invariance) -> embedding G_t'(s) per neighbour element t' (25, 50, 100, tanh, ResNet-doubling) ->
  T = G^T R / nslot (n, M1, 4) -> D = T T_<^T (n, M1, M2) -> fitting MLP (240, 240, 240, ResNet) -> E_i

Scaling only (no mean shift) of R keeps an empty slot and a neighbour leaving the cutoff both at exactly
zero, so the energy stays smooth at rcut.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["MLP", "LocFrameNet", "SeANet", "build_network"]


class MLP(nn.Module):
    """tanh MLP with a linear scalar output and a hand-written input gradient.

    ResNet connections as in deepmd-kit: a layer whose width equals its input's adds the input; one whose
    width doubles it adds the input concatenated with itself.
    """

    def __init__(self, n_in: int, hidden: list[int], out: bool = True, dtype=torch.float32):
        super().__init__()
        self.layers = nn.ModuleList()
        self.kinds = []
        d = n_in
        for h in hidden:
            lin = nn.Linear(d, h, dtype=dtype)
            nn.init.normal_(lin.weight, std=1.0 / math.sqrt(d + h))
            nn.init.normal_(lin.bias, std=1.0)
            self.layers.append(lin)
            self.kinds.append("same" if h == d else "double" if h == 2 * d else "plain")
            d = h
        self.out = nn.Linear(d, 1, dtype=dtype) if out else None
        if self.out is not None:
            nn.init.normal_(self.out.weight, std=1.0 / math.sqrt(d + 1))
            nn.init.zeros_(self.out.bias)
        self.width = d

    def forward_acts(self, x):
        hs, acts = [x], []
        h = x
        for lin, kind in zip(self.layers, self.kinds, strict=True):
            a = torch.tanh(lin(h))
            acts.append(a)
            if kind == "same":
                h = a + h
            elif kind == "double":
                h = a + torch.cat([h, h], dim=-1)
            else:
                h = a
            hs.append(h)
        return h, acts

    def backward_from(self, g, acts):
        """Given dE/d(last hidden), return dE/d(input)."""
        for lin, kind, a in zip(reversed(self.layers), reversed(self.kinds), reversed(acts), strict=True):
            gz = g * (1 - a * a)
            gin = gz @ lin.weight
            if kind == "same":
                gin = gin + g
            elif kind == "double":
                half = g.shape[-1] // 2
                gin = gin + g[..., :half] + g[..., half:]
            g = gin
        return g

    def energy_and_grad(self, x):
        """x (..., n_in) -> (e (...,), de/dx (..., n_in))."""
        h, acts = self.forward_acts(x)
        e = self.out(h).squeeze(-1)
        g = self.out.weight.reshape(-1).expand_as(h)
        return e, self.backward_from(g, acts)


class LocFrameNet(nn.Module):
    """One fitting network per element on the flat loc_frame features."""

    def __init__(self, ntypes: int, dim: int, fitting: list[int], dtype=torch.float32):
        super().__init__()
        self.ntypes, self.dim = ntypes, dim
        self.fit = nn.ModuleList([MLP(dim, fitting, dtype=dtype) for _ in range(ntypes)])
        self.register_buffer("mean", torch.zeros(ntypes, dim, dtype=dtype))
        self.register_buffer("std", torch.ones(ntypes, dim, dtype=dtype))

    def forward_type(self, t: int, x):
        """x (n, dim) -> (e (n,), g (n, dim))."""
        xn = (x - self.mean[t]) / self.std[t]
        e, g = self.fit[t].energy_and_grad(xn)
        return e, g / self.std[t]


class SeANet(nn.Module):
    """se_e2_a embedding + fitting networks (embedding per neighbour element, fitting per centre element)."""

    def __init__(self, ntypes: int, sel: list[int], embed: list[int], axis: int, fitting: list[int], dtype=torch.float32):
        super().__init__()
        self.ntypes, self.sel = ntypes, list(sel)
        self.nslot = sum(sel)
        self.m1, self.m2 = embed[-1], axis
        self.embed = nn.ModuleList([MLP(1, embed, out=False, dtype=dtype) for _ in range(ntypes)])
        self.fit = nn.ModuleList([MLP(self.m1 * self.m2, fitting, dtype=dtype) for _ in range(ntypes)])
        # std (centre type, slot, column); filled from data statistics
        self.register_buffer("std", torch.ones(ntypes, self.nslot, 4, dtype=dtype))
        bounds = [0]
        for s in sel:
            bounds.append(bounds[-1] + s)
        self.bounds = bounds

    def forward_type(self, t: int, R):
        """R (n, nslot, 4) -> (e (n,), dE/dR (n, nslot, 4))."""
        Rn = R / self.std[t]  # (n, nslot, 4)
        Gs, acts = [], []
        for tt in range(self.ntypes):
            s = Rn[:, self.bounds[tt] : self.bounds[tt + 1], 0:1]  # (n, sel_tt, 1)
            G, a = self.embed[tt].forward_acts(s)
            Gs.append(G)
            acts.append(a)
        G = torch.cat(Gs, dim=1)  # (n, nslot, M1)
        T = torch.einsum("nkm,nkc->nmc", G, Rn) / self.nslot  # (n, M1, 4)
        T2 = T[:, : self.m2, :]  # (n, M2, 4)
        D = torch.einsum("nmc,npc->nmp", T, T2)  # (n, M1, M2)
        n = R.shape[0]
        e, gD = self.fit[t].energy_and_grad(D.reshape(n, self.m1 * self.m2))
        gD = gD.reshape(n, self.m1, self.m2)
        gT = torch.einsum("nmp,npc->nmc", gD, T2)  # (n, M1, 4)
        gT2 = torch.einsum("nmp,nmc->npc", gD, T)  # (n, M2, 4)
        gT = gT + torch.cat([gT2, torch.zeros_like(gT[:, self.m2 :, :])], dim=1)
        gRn = torch.einsum("nkm,nmc->nkc", G, gT) / self.nslot  # (n, nslot, 4)
        gG = torch.einsum("nkc,nmc->nkm", Rn, gT) / self.nslot  # (n, nslot, M1)
        gs = []
        for tt in range(self.ntypes):
            gg = gG[:, self.bounds[tt] : self.bounds[tt + 1], :]
            gs.append(self.embed[tt].backward_from(gg, acts[tt]))  # (n, sel_tt, 1)
        gs = torch.cat(gs, dim=1)
        gRn = gRn + torch.cat([gs, torch.zeros_like(gRn[..., 1:])], dim=-1)
        return e, gRn / self.std[t]


def build_network(kind: str, ntypes: int, params: dict, dtype=torch.float32) -> nn.Module:
    if kind == "loc_frame":
        return LocFrameNet(ntypes, params["dim"], params["fitting"], dtype=dtype)
    if kind == "se_e2_a":
        return SeANet(ntypes, params["sel"], params["embedding"], params["axis"], params["fitting"], dtype=dtype)
    raise ValueError(f"unknown descriptor type {kind!r}; allowed: 'loc_frame', 'se_e2_a'")


class ExportWrapper(nn.Module):
    """ONNX export: inputs x0..x{nt-1}, outputs e0.., g0.. (see app.inference.model)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, *xs):
        es, gs = [], []
        for t, x in enumerate(xs):
            e, g = self.net.forward_type(t, x)
            es.append(e)
            gs.append(g)
        return (*es, *gs)


class FittingExportWrapper(nn.Module):
    """ONNX export of se_e2_a's fitting networks alone (compressed serving, app.inference.compressed):
    inputs d0..d{nt-1} (n_t, M1*M2) descriptors, outputs e0.., gd0.. (atomic energies, dE/dd)."""

    def __init__(self, net: SeANet):
        super().__init__()
        self.net = net

    def forward(self, *ds):
        es, gs = [], []
        for t, d in enumerate(ds):
            e, g = self.net.fit[t].energy_and_grad(d)
            es.append(e)
            gs.append(g)
        return (*es, *gs)


def embedding_arrays(net: SeANet) -> dict:
    """The embedding networks and normalisation of an se_e2_a net as plain float64 arrays (embedding.npz)."""
    out = {"ntypes": net.ntypes, "sel": list(net.sel), "m1": net.m1, "m2": net.m2,
           "std": net.std.detach().to(torch.float64).numpy()}
    for tt, mlp in enumerate(net.embed):
        out[f"embed{tt}_nlayers"] = len(mlp.layers)
        for li, (lin, kind) in enumerate(zip(mlp.layers, mlp.kinds, strict=True)):
            out[f"embed{tt}_w{li}"] = lin.weight.detach().to(torch.float64).numpy()
            out[f"embed{tt}_b{li}"] = lin.bias.detach().to(torch.float64).numpy()
            out[f"embed{tt}_kind{li}"] = kind
    return out
