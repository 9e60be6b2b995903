"""Frames as torch tensors: the numpy descriptor, its derivative blocks, labels; batching; the forward pass.

Each frame is run once through the *serving* descriptor code (:mod:`app.physics`); what is kept is, per
filled neighbour slot (pair p of centre c and neighbour j)::

    J[p]  (4, 3)  d env[c, slot, :] / d rij            (both descriptors)
    Ja[p], Jb[p]  d env[c, slot, :] / d a, d b          (loc_frame: the two axis vectors of c)
    gidx[p] (4,)  where each env column sits in the network input x[c] (-1: not an input)

Then for network gradients g = dE/dx (hand-written in :mod:`training.model`, differentiable by autograd)::

    dE/drij[p] = sum_c g[c, gidx[p, c]] J[p, c, :]  (+ loc_frame axis terms on the axis pairs)
    F = index_add(c, dE/drij) - index_add(j, dE/drij)       Xi = - sum_p rij[p] (x) dE/drij[p]

which is exactly the vector-Jacobian product the service runs in numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from app.physics.descriptors import LocFrame, make_descriptor
from app.physics.neighbors import neighbor_list
from training.data import find_systems, read_deepmd_system, read_extxyz

__all__ = ["Batch", "prepare_system_frames", "collate", "forward", "load_systems", "descriptor_from_config"]


def load_systems(paths: list[str], type_map: list[str] | None = None):
    """Read every system under ``paths`` and map its element indices onto ``type_map`` (default: the
    first system's). Returns (systems, type_map)."""
    systems = []
    for p in paths:
        p = Path(p)
        if p.is_file():
            systems.append(read_extxyz(p))
        elif (p / "type.raw").is_file():
            systems.append(read_deepmd_system(p))
        else:
            found = find_systems(p)
            if not found:
                raise FileNotFoundError(f"{p}: no DeePMD system (a folder with type.raw) or extxyz file found")
            systems.extend(read_deepmd_system(s) for s in found)
    if not type_map:
        type_map = list(systems[0].type_map)
    for s in systems:
        missing = [e for e in s.type_map if e not in type_map and e in [s.type_map[t] for t in np.unique(s.types)]]
        if missing:
            raise ValueError(f"system {s.name} has elements {missing} not in type_map {type_map}")
        remap = np.array([type_map.index(e) if e in type_map else -1 for e in s.type_map])
        s.types = remap[s.types]
        s.type_map = list(type_map)
    return systems, type_map


def descriptor_from_config(dcfg, type_map):
    d = dict(type=dcfg.type, rcut=dcfg.rcut)
    if dcfg.type == "se_e2_a":
        d.update(rcut_smth=dcfg.rcut_smth, sel=list(dcfg.sel))
    else:
        d.update(sel_a=list(dcfg.sel_a), sel_r=list(dcfg.sel_r), axis_rule={e: dcfg.axis_rule[e] for e in type_map})
    for key in ("sel", "sel_a", "sel_r"):
        if key in d and len(d[key]) != len(type_map):
            raise ValueError(f"descriptor.{key} needs one entry per element of type_map {type_map}, got {d[key]}")
    return d, make_descriptor(d, type_map)


@dataclass
class Batch:
    """One or more frames packed together (atoms of all frames, pairs of all frames)."""

    nframes: int
    natoms: np.ndarray  # (nframes,) atoms per frame
    xs: list  # per element: network input (n_t, ...)
    order_frame: torch.Tensor  # (n,) frame of each atom in element order
    order_atom: torch.Tensor  # (n,) global atom index of each atom in element order
    gather: torch.Tensor  # (P, 4) index into g (n_elem_order, xdim + 1) flattened
    J: torch.Tensor  # (P, 4, 3)
    Ja: torch.Tensor | None  # (P, 4, 3)
    Jb: torch.Tensor | None
    c: torch.Tensor  # (P,) global centre atom
    j: torch.Tensor  # (P,) global neighbour atom
    pair_frame: torch.Tensor  # (P,)
    rij: torch.Tensor  # (P, 3)
    ax_pair: torch.Tensor | None  # (2, A) for loc_frame: (axis pair index, centre atom) for a; see forward
    ax_b_pair: torch.Tensor | None
    energy: torch.Tensor  # (nframes,) label minus energy bias (float64)
    forces: torch.Tensor  # (natoms_total, 3)
    virial: torch.Tensor | None  # (nframes, 3, 3) or None
    has_virial: bool
    xdim: int


def _frame_arrays(desc, types, coord, cell, pbc):
    """numpy arrays for one frame (see module docstring)."""
    nl = neighbor_list(coord, cell, pbc, desc.rcut)
    ch = desc.compute(nl, types)
    n, nslot = ch.slots.pair.shape
    mask = ch.slots.mask
    c_idx, k_idx = np.nonzero(mask)  # (P,)
    if isinstance(desc, LocFrame):
        x = desc.features(ch.env)
        fmap = desc.features_grad_to_env(np.arange(1, desc.dim + 1, dtype=np.float64)[None, :]).astype(np.int64)[0] - 1
        gidx = fmap[k_idx]  # (P, 4)
        xdim = desc.dim
    else:
        x = ch.env
        xdim = nslot * 4
        gidx = k_idx[:, None] * 4 + np.arange(4)[None, :]
    out = dict(
        x=x,
        c=c_idx,
        j=nl.j[ch.slots.pair[mask]],
        gidx=gidx,
        J=ch.jac[mask],
        rij=ch.slots.rij[mask],
        xdim=xdim,
        n_dropped=int(ch.slots.n_dropped.sum()),
    )
    if isinstance(desc, LocFrame):
        out["Ja"] = ch.jac_a[mask]
        out["Jb"] = ch.jac_b[mask]
        # pair index (within the frame's P) of each centre's axis atoms, -1 if none
        pair_of_slot = -np.ones((n, nslot), dtype=np.int64)
        pair_of_slot[c_idx, k_idx] = np.arange(len(c_idx))
        rows = np.arange(n)
        out["axis_pair"] = np.stack(
            [np.where(ch.axis[:, m] >= 0, pair_of_slot[rows, np.maximum(ch.axis[:, m], 0)], -1) for m in range(2)], 1
        )
    return out


def prepare_system_frames(desc, system, frames, energy_bias, dtype=torch.float32):
    """Per-frame dicts of numpy arrays + labels for the given frame indices of one system."""
    out = []
    for f in frames:
        cell = system.cells[f] if system.cells is not None else None
        arr = _frame_arrays(desc, system.types, system.coords[f], cell, system.pbc)
        arr["types"] = system.types
        arr["energy"] = float(system.energies[f] - energy_bias[system.types].sum())
        arr["forces"] = system.forces[f]
        arr["virial"] = system.virials[f] if system.virials is not None else None
        arr["system"] = system.name
        arr["frame"] = int(f)
        out.append(arr)
    return out


def collate(frames: list[dict], ntypes: int, dtype=torch.float32) -> Batch:
    """Pack frame dicts into one :class:`Batch` (atom and pair indices offset per frame)."""
    natoms = np.array([len(f["types"]) for f in frames])
    atom_off = np.concatenate([[0], np.cumsum(natoms)[:-1]])
    types = np.concatenate([f["types"] for f in frames])
    frame_of_atom = np.repeat(np.arange(len(frames)), natoms)
    order = np.concatenate([np.flatnonzero(types == t) for t in range(ntypes)])
    pos_in_order = np.empty(len(types), dtype=np.int64)
    pos_in_order[order] = np.arange(len(types))
    xdim = frames[0]["xdim"]
    x_all = np.concatenate([f["x"] for f in frames])
    xs = [torch.as_tensor(x_all[types == t], dtype=dtype) for t in range(ntypes)]
    c = np.concatenate([f["c"] + o for f, o in zip(frames, atom_off, strict=True)])
    j = np.concatenate([f["j"] + o for f, o in zip(frames, atom_off, strict=True)])
    gidx = np.concatenate([f["gidx"] for f in frames])
    gidx = np.where(gidx < 0, xdim, gidx)
    gather = pos_in_order[c][:, None] * (xdim + 1) + gidx
    npairs = np.array([len(f["c"]) for f in frames])
    pair_off = np.concatenate([[0], np.cumsum(npairs)[:-1]])
    pair_frame = np.repeat(np.arange(len(frames)), npairs)
    is_loc = "Ja" in frames[0]
    ax_pair = ax_b_pair = None
    if is_loc:
        ap = np.concatenate([np.where(f["axis_pair"] >= 0, f["axis_pair"] + po, -1) for f, po in zip(frames, pair_off, strict=True)])
        # for each axis m: (target pair, centre atom) for centres that have that axis atom
        ax = []
        for m in range(2):
            ok = ap[:, m] >= 0
            ax.append(torch.as_tensor(np.stack([ap[ok, m], np.flatnonzero(ok)]), dtype=torch.long))
        ax_pair, ax_b_pair = ax
    has_virial = all(f["virial"] is not None for f in frames)
    t = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=dtype)  # noqa: E731
    return Batch(
        nframes=len(frames),
        natoms=natoms,
        xs=xs,
        order_frame=torch.as_tensor(frame_of_atom[order]),
        order_atom=torch.as_tensor(order),
        gather=torch.as_tensor(gather),
        J=t(np.concatenate([f["J"] for f in frames])),
        Ja=t(np.concatenate([f["Ja"] for f in frames])) if is_loc else None,
        Jb=t(np.concatenate([f["Jb"] for f in frames])) if is_loc else None,
        c=torch.as_tensor(c),
        j=torch.as_tensor(j),
        pair_frame=torch.as_tensor(pair_frame),
        rij=t(np.concatenate([f["rij"] for f in frames])),
        ax_pair=ax_pair,
        ax_b_pair=ax_b_pair,
        energy=torch.tensor([f["energy"] for f in frames], dtype=torch.float64),
        forces=t(np.concatenate([f["forces"] for f in frames])),
        virial=t(np.stack([f["virial"] for f in frames])) if has_virial else None,
        has_virial=has_virial,
        xdim=xdim,
    )


def forward(net, b: Batch, ntypes: int, need_virial: bool = True):
    """Energies (nframes,) float64, forces (natoms, 3), virials (nframes, 3, 3) of a batch."""
    es, gs = [], []
    for t in range(ntypes):
        x = b.xs[t]
        if x.shape[0] == 0:
            continue
        e, g = net.forward_type(t, x)
        es.append(e)
        gs.append(g.reshape(x.shape[0], -1))
    e_all = torch.cat(es)
    g_all = torch.cat(gs)
    g_pad = torch.cat([g_all, torch.zeros_like(g_all[:, :1])], dim=1).reshape(-1)
    gv = g_pad[b.gather]  # (P, 4)
    dEdr = torch.einsum("pc,pcx->px", gv, b.J)
    if b.Ja is not None:
        # axis terms: sum over all pairs of a centre of g . Ja, added to the centre's axis pair
        n = len(b.order_atom)
        for Jx, ax in ((b.Ja, b.ax_pair), (b.Jb, b.ax_b_pair)):
            per_pair = torch.einsum("pc,pcx->px", gv, Jx)
            per_centre = torch.zeros(n, 3, dtype=dEdr.dtype).index_add(0, b.c, per_pair)
            dEdr = dEdr.index_add(0, ax[0], per_centre[ax[1]])
    natoms_total = int(b.natoms.sum())
    forces = torch.zeros(natoms_total, 3, dtype=dEdr.dtype).index_add(0, b.c, dEdr).index_add(0, b.j, -dEdr)
    energy = torch.zeros(b.nframes, dtype=torch.float64).index_add(0, b.order_frame, e_all.to(torch.float64))
    virial = None
    if need_virial:
        outer = -(b.rij[:, :, None] * dEdr[:, None, :]).reshape(-1, 9)
        virial = torch.zeros(b.nframes, 9, dtype=dEdr.dtype).index_add(0, b.pair_frame, outer).reshape(-1, 3, 3)
    return energy, forces, virial
