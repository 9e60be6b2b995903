"""`dpserve test`: the figures of deepmd-kit's `dp test` for an exported model on data systems.

The model is evaluated exactly as the server evaluates it (onnxruntime + numpy descriptor). Printed per
system and over all systems (RMSE and MAE):

    Energy RMSE (eV), Energy RMSE/Natoms (eV), Force RMSE (eV/A), Virial RMSE (eV), Virial RMSE/Natoms (eV)

This module imports no torch: it runs with the serving dependencies alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from app.inference.model import DeepPotModel, Frame
from training.data import find_systems, read_deepmd_system, read_extxyz, system_key

__all__ = ["evaluate_model", "evaluate_cli", "resolve_model_dir"]


def resolve_model_dir(model: str, store: str = "model_store") -> Path:
    p = Path(model)
    if (p / "manifest.json").is_file():
        return p
    cand = Path(store) / model
    if (cand / "manifest.json").is_file():
        return cand
    if cand.is_dir():
        versions = sorted((d for d in cand.iterdir() if (d / "manifest.json").is_file()), key=lambda d: _vkey(d.name))
        if versions:
            return versions[-1]
    raise FileNotFoundError(f"no model {model!r}: neither a model directory nor NAME[/VERSION] in store {store}")


def _vkey(v: str):
    return (0, int(v), "") if v.isdigit() else (1, 0, v)


def _systems(paths):
    out = []
    for p in map(Path, paths):
        if p.is_file():
            out.append(read_extxyz(p))
        elif (p / "type.raw").is_file():
            out.append(read_deepmd_system(p))
        else:
            out.extend(read_deepmd_system(s) for s in find_systems(p))
    return out


def evaluate_model(model: DeepPotModel, systems, numb_test: int = 0, only_val: bool = False) -> dict:
    """Errors of ``model`` on ``systems``: per system and overall. ``only_val`` restricts each system to the
    frames the model held out during training (from its manifest's training split)."""
    split = model.manifest.get("training", {}).get("split", {})
    per, all_e, all_ea, all_f, all_v, all_va = {}, [], [], [], [], []
    for s in systems:
        remap = np.array([model.type_map.index(e) if e in model.type_map else -1 for e in s.type_map])
        types = remap[s.types]
        if (types < 0).any():
            raise ValueError(f"system {s.name} has elements the model {model.name} lacks (it knows {model.type_map})")
        frames = np.arange(s.nframes)
        if only_val:
            key = system_key(s.name)
            if key not in split:
                raise ValueError(f"model manifest has no training split for system {key}")
            frames = np.asarray(split[key], dtype=int)
        if numb_test:
            frames = frames[:numb_test]
        de, df, dv = [], [], []
        for f in frames:
            cell = s.cells[f] if s.cells is not None else None
            r = model.predict([Frame(types, s.coords[f], cell, s.pbc)])[0]
            de.append(r["energy"] - s.energies[f])
            df.append((r["forces"] - s.forces[f]).ravel())
            if s.virials is not None:
                dv.append((r["virial"] - s.virials[f]).ravel())
        de, df = np.array(de), np.concatenate(df)
        n = s.natoms
        res = {
            "frames": len(frames),
            "natoms": n,
            "energy_rmse": float(np.sqrt(np.mean(de**2))),
            "energy_rmse_per_atom": float(np.sqrt(np.mean(de**2)) / n),
            "energy_mae": float(np.mean(np.abs(de))),
            "energy_mae_per_atom": float(np.mean(np.abs(de)) / n),
            "force_rmse": float(np.sqrt(np.mean(df**2))),
            "force_mae": float(np.mean(np.abs(df))),
        }
        if dv:
            dv = np.concatenate(dv)
            res.update(virial_rmse=float(np.sqrt(np.mean(dv**2))), virial_rmse_per_atom=float(np.sqrt(np.mean(dv**2)) / n),
                       virial_mae=float(np.mean(np.abs(dv))))
            all_v.append(dv)
            all_va.append(dv / n)
        per[s.name] = res
        all_e.append(de)
        all_ea.append(de / n)
        all_f.append(df)
    e, ea, f = np.concatenate(all_e), np.concatenate(all_ea), np.concatenate(all_f)
    total = {
        "frames": int(len(e)),
        "energy_rmse": float(np.sqrt(np.mean(e**2))),
        "energy_rmse_per_atom": float(np.sqrt(np.mean(ea**2))),
        "energy_mae": float(np.mean(np.abs(e))),
        "energy_mae_per_atom": float(np.mean(np.abs(ea))),
        "force_rmse": float(np.sqrt(np.mean(f**2))),
        "force_mae": float(np.mean(np.abs(f))),
    }
    if all_v:
        v, va = np.concatenate(all_v), np.concatenate(all_va)
        total.update(virial_rmse=float(np.sqrt(np.mean(v**2))), virial_rmse_per_atom=float(np.sqrt(np.mean(va**2))))
    return {"model": f"{model.name}/{model.version}", "systems": per, "total": total}


def format_report(rep: dict) -> str:
    lines = [f"# model {rep['model']}"]

    def block(name, r):
        lines.append(f"# system: {name}  ({r['frames']} frames)")
        lines.append(f"Energy RMSE        : {r['energy_rmse']:e} eV")
        lines.append(f"Energy RMSE/Natoms : {r['energy_rmse_per_atom']:e} eV")
        lines.append(f"Energy MAE/Natoms  : {r['energy_mae_per_atom']:e} eV")
        lines.append(f"Force  RMSE        : {r['force_rmse']:e} eV/A")
        lines.append(f"Force  MAE         : {r['force_mae']:e} eV/A")
        if "virial_rmse" in r:
            lines.append(f"Virial RMSE        : {r['virial_rmse']:e} eV")
            lines.append(f"Virial RMSE/Natoms : {r['virial_rmse_per_atom']:e} eV")

    for name, r in rep["systems"].items():
        block(name, r)
    block("ALL (weighted by frame; per-atom figures averaged over frames)", rep["total"])
    return "\n".join(lines)


def evaluate_cli(args) -> int:
    model = DeepPotModel.load(resolve_model_dir(args.model, args.store), device="cpu")
    rep = evaluate_model(model, _systems(args.system), args.numb_test, only_val=args.frames == "val")
    print(format_report(rep))
    print(json.dumps(rep["total"]))
    return 0
