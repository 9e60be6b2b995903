"""Packing many small isolated frames into one model call without per-frame overhead.

``DeepPotModel.predict`` builds a neighbour list and descriptor blocks per frame; for a 7-atom molecule
that fixed cost (about a millisecond) dwarfs the arithmetic. Because the model is local (an atom sees only
neighbours within ``rcut``), isolated frames can be laid out side by side in one *packed frame*, on a
grid whose spacing exceeds every frame's extent plus ``rcut`` plus a margin: no pair crosses frames, so
every atomic energy and force is that of the frame alone. Frame k's slice then gives:

* ``atomic_energies`` and ``forces``: the packed rows of its atoms;
* ``energy = sum(atomic_energies)`` (float64, as predict sums it);
* ``virial = sum_a r_a (outer) F_a`` over its atoms. For an isolated system this equals the pair form
  ``-sum_(i,j) r_ij (outer) dE_i/dr_ij`` of design.md: each pair term adds dE_i/dr_ij to F_i and
  subtracts it from F_j, so ``sum_a r_a (outer) F_a = sum_(i,j) (r_i - r_j) (outer) dE_i/dr_ij``. The
  positions used are the frame's own, centred (sum_a F_a = 0, so the origin does not matter).

Only the placement (a translation, exact up to the rounding of coordinates of at most a few hundred
Angstrom, ~1e-14 relative) depends on the other frames of the call. Every small isolated frame takes
this path, also when alone, so a frame's numbers do not depend on its batch partners. When a packed
frame reports neighbours beyond the model's sel, its frames are evaluated one by one instead, so that
``n_dropped`` is per frame.
"""

from __future__ import annotations

import numpy as np

from app.inference.model import DeepPotModel, Frame

__all__ = ["PACK_MAX_ATOMS", "predict_frames"]

PACK_MAX_ATOMS = 256  # isolated frames up to this size are packed
_MARGIN = 1.0  # Angstrom, added to rcut between packed frames


def _packable(f: Frame) -> bool:
    isolated = f.cell is None or f.pbc is None or not np.any(f.pbc)
    return isolated and len(f.types) <= PACK_MAX_ATOMS


def _pack(frames: list[Frame], rcut: float) -> tuple[Frame, list[slice], list[np.ndarray]]:
    """One isolated Frame holding all ``frames`` on a cubic grid; returns it, each frame's atom slice, and
    each frame's centred positions."""
    centred = []
    for f in frames:
        p = np.asarray(f.positions, dtype=np.float64)
        centred.append(p - 0.5 * (p.min(0) + p.max(0)))
    extent = max(float(np.abs(c).max()) for c in centred) * 2
    spacing = extent + rcut + _MARGIN
    side = int(np.ceil(len(frames) ** (1 / 3) - 1e-9))
    grid = np.array(np.unravel_index(np.arange(len(frames)), (side, side, side))).T * spacing  # (m, 3)
    positions = np.concatenate([c + g for c, g in zip(centred, grid, strict=True)])
    types = np.concatenate([np.asarray(f.types, dtype=np.int64) for f in frames])
    bounds = np.cumsum([0] + [len(f.types) for f in frames])
    slices = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return Frame(types=types, positions=positions), slices, centred


def _groups(indices: list[int], frames: list[Frame], max_atoms: int) -> list[list[int]]:
    groups, current, atoms = [], [], 0
    for k in indices:
        n = len(frames[k].types)
        if current and atoms + n > max_atoms:
            groups.append(current)
            current, atoms = [], 0
        current.append(k)
        atoms += n
    if current:
        groups.append(current)
    return groups


def predict_frames(model: DeepPotModel, frames: list[Frame], atomic_energies: bool = False,
                   chunk_atoms: int = 8192, cancelled=None) -> list[dict]:
    """Same results as ``model.predict(frames, atomic_energies, chunk_atoms)``, in one predict call, with
    small isolated frames packed (see the module docstring). ``cancelled(k)``: frame k's caller is gone
    (see DeepPotModel.predict); honoured for the frames that are not packed (the large ones)."""
    small = [k for k, f in enumerate(frames) if _packable(f)]
    if not small:
        return model.predict(frames, atomic_energies=atomic_energies, chunk_atoms=chunk_atoms, cancelled=cancelled)
    small_set = set(small)
    others = [k for k in range(len(frames)) if k not in small_set]
    groups = _groups(small, frames, chunk_atoms)
    packs = [_pack([frames[k] for k in g], model.rcut) for g in groups]
    call = [p[0] for p in packs] + [frames[k] for k in others]
    skip = None
    if cancelled is not None:
        skip = lambda i: i >= len(packs) and cancelled(others[i - len(packs)])  # noqa: E731
    out = model.predict(call, atomic_energies=True, chunk_atoms=chunk_atoms, cancelled=skip)
    results: list[dict | None] = [None] * len(frames)
    for k, r in zip(others, out[len(packs):], strict=True):
        if not atomic_energies:
            r.pop("atomic_energies", None)
        results[k] = r
    for g, (_, slices, centred), packed in zip(groups, packs, out[: len(packs)], strict=True):
        if packed["n_dropped"]:
            alone = model.predict([frames[k] for k in g], atomic_energies=atomic_energies, chunk_atoms=chunk_atoms)
            for k, r in zip(g, alone, strict=True):
                results[k] = r
            continue
        for k, sl, pos in zip(g, slices, centred, strict=True):
            ae = packed["atomic_energies"][sl]
            forces = packed["forces"][sl]
            r = {"energy": float(np.sum(ae, dtype=np.float64)), "forces": forces,
                 "virial": pos.T @ forces, "n_dropped": 0}  # virial (3, 3) = sum_a r_a (outer) F_a
            if atomic_energies:
                r["atomic_energies"] = ae
            results[k] = r
    return results
