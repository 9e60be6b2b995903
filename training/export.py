"""Export a training checkpoint to ONNX in the model store: `dpserve export CHECKPOINT --name N --version V`.

Writes ``<store>/<name>/<version>/`` with ``model.onnx`` and ``manifest.json`` (see app.inference.model for
the graph's inputs and outputs), plus the run's config, learning curve and plots when present. Then checks
itself: the exported model, loaded exactly as the server loads it (onnxruntime + numpy descriptor), is
compared with the torch model on validation frames (energies and forces), and the largest differences are
written to the manifest and printed.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from app.inference.model import FORMAT_VERSION, MANIFEST_NAME, DeepPotModel, Frame, sha256_file
from training.config import config_from_dict
from training.data import system_key
from training.dataset import collate, descriptor_from_config, forward, load_systems, prepare_system_frames
from training.model import ExportWrapper, FittingExportWrapper, build_network, embedding_arrays

__all__ = ["export_checkpoint", "load_checkpoint_net"]


def load_checkpoint_net(ckpt: dict, dtype=torch.float64):
    net = build_network(ckpt["descriptor"]["type"], len(ckpt["type_map"]), ckpt["network"], dtype=dtype)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in ckpt["net_state"].items()}
    net.load_state_dict(state)
    net.eval()
    return net


def _example_inputs(desc_params, net, ntypes, dtype):
    if desc_params["type"] == "loc_frame":
        return tuple(torch.zeros(2, net.dim, dtype=dtype) for _ in range(ntypes))
    return tuple(torch.zeros(2, net.nslot, 4, dtype=dtype) + 0.1 for _ in range(ntypes))


def export_checkpoint(
    checkpoint,
    name: str,
    version: str,
    store="model_store",
    precision: str = "float32",
    check_frames: int = 8,
    metrics: dict | None = None,
    overwrite: bool = False,
    validation_metrics: bool = True,
    repulsion: str = "zbl",
    log=print,
) -> Path:
    if precision not in ("float32", "float64"):
        raise ValueError(f"precision must be 'float32' or 'float64', got {precision!r}")
    checkpoint = Path(checkpoint)
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    type_map = ckpt["type_map"]
    nt = len(type_map)
    dtype = torch.float32 if precision == "float32" else torch.float64
    net = load_checkpoint_net(ckpt, dtype)
    wrapper = ExportWrapper(net)
    inputs = [f"x{t}" for t in range(nt)]
    e_out = [f"e{t}" for t in range(nt)]
    g_out = [f"g{t}" for t in range(nt)]
    dyn = {}
    for t in range(nt):
        for n in (inputs[t], e_out[t], g_out[t]):
            dyn[n] = {0: f"n{t}"}  # each element its own atom count
    dest = Path(store) / name / str(version)
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} exists; choose another version (a model store entry is never overwritten)")
    with tempfile.TemporaryDirectory(dir=Path(store)) if Path(store).exists() else tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                _example_inputs(ckpt["descriptor"], net, nt, dtype),
                str(tmp / "model.onnx"),
                input_names=inputs,
                output_names=e_out + g_out,
                dynamic_axes=dyn,
                dynamo=False,
                opset_version=17,
            )
        compression = None
        if ckpt["descriptor"]["type"] == "se_e2_a":
            compression = _export_compressed(net, tmp, nt, dtype)
        cfg = ckpt["config"]
        rep = None
        if repulsion == "zbl":
            from app.physics.repulsion import repulsion_for

            systems, _ = load_systems(config_from_dict(cfg).data.systems, type_map)
            rep = repulsion_for(systems, type_map)
            log("repulsion (ZBL below the training data's closest pairs): " + ", ".join(
                f"{k} {a:.2f}-{b:.2f} A" for k, (a, b) in rep["pairs"].items()))
        elif repulsion != "none":
            raise ValueError(f"repulsion must be 'zbl' or 'none', got {repulsion!r}")
        manifest = {
            "format_version": FORMAT_VERSION,
            "name": name,
            "version": str(version),
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "type_map": type_map,
            "descriptor": ckpt["descriptor"],
            "network": ckpt["network"],
            "energy_bias": {e: float(b) for e, b in zip(type_map, ckpt["energy_bias"], strict=True)},
            "normalisation": _normalisation(net, ckpt["descriptor"]["type"], type_map),
            "onnx": {
                "file": "model.onnx",
                "sha256": sha256_file(tmp / "model.onnx"),
                "precision": precision,
                "opset": 17,
                "inputs": {e: inputs[t] for t, e in enumerate(type_map)},
                "outputs": {e: {"energy": e_out[t], "grad": g_out[t]} for t, e in enumerate(type_map)},
            },
            **({"compression": compression} if compression else {}),
            **({"repulsion": rep} if rep else {}),
            "training": {
                "data": cfg["data"]["systems"],
                "steps": ckpt["step"],
                "minutes": round(ckpt["elapsed"] / 60, 2),
                "config": cfg,
                "last_validation": ckpt["rows"][-1] if ckpt["rows"] else None,
                "split": {system_key(k): v[1] for k, v in ckpt["split"].items()},  # validation frames per system
            },
            "metrics": metrics or {},
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
        check = self_check(tmp, ckpt, check_frames, log=log)
        manifest["export_check"] = check
        if validation_metrics:
            manifest["metrics"] = {**manifest["metrics"], "validation": _validation_metrics(tmp, ckpt, log=log)}
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
        run_dir = checkpoint.parent
        for extra in ("lcurve.csv", "lcurve.png", "parity.png"):
            if (run_dir / extra).is_file():
                shutil.copy(run_dir / extra, tmp / extra)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(tmp, dest)
    log(f"exported {name}/{version} to {dest}")
    return dest


def _export_compressed(net, tmp: Path, nt: int, dtype) -> dict:
    """se_e2_a: the fitting networks alone (fitting.onnx) and the embedding weights (embedding.npz), from
    which the server tabulates the embeddings at load time (app.inference.compressed)."""
    m = net.m1 * net.m2
    inputs = [f"d{t}" for t in range(nt)]
    e_out = [f"e{t}" for t in range(nt)]
    g_out = [f"gd{t}" for t in range(nt)]
    dyn = {n: {0: f"n{t}"} for t in range(nt) for n in (inputs[t], e_out[t], g_out[t])}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(FittingExportWrapper(net), tuple(torch.zeros(2, m, dtype=dtype) + 0.1 for _ in range(nt)),
                          str(tmp / "fitting.onnx"), input_names=inputs, output_names=e_out + g_out, dynamic_axes=dyn,
                          dynamo=False, opset_version=17)
    np.savez(tmp / "embedding.npz", **embedding_arrays(net))
    type_map_idx = range(nt)
    return {
        "fitting": {"file": "fitting.onnx", "sha256": sha256_file(tmp / "fitting.onnx"),
                    "inputs": [inputs[t] for t in type_map_idx],
                    "outputs": [{"energy": e_out[t], "grad": g_out[t]} for t in type_map_idx]},
        "embedding": {"file": "embedding.npz", "sha256": sha256_file(tmp / "embedding.npz")},
    }


def _normalisation(net, kind, type_map):
    if kind == "loc_frame":
        return {e: {"mean": net.mean[t].tolist(), "std": net.std[t].tolist()} for t, e in enumerate(type_map)}
    # se_e2_a: std per (centre element, neighbour slot group, column); store the distinct values
    out = {}
    for t, e in enumerate(type_map):
        s = net.std[t]
        out[e] = {type_map[tt]: [float(s[net.bounds[tt], 0]), float(s[net.bounds[tt], 1])] for tt in range(len(type_map))}
    return {"std_s_and_xyz": out}


def _validation_metrics(model_dir: Path, ckpt: dict, log=print) -> dict:
    """dp-test figures of the exported model (as served) on the frames held out during training."""
    from training.evaluate import evaluate_model

    cfg = config_from_dict(ckpt["config"])
    systems, _ = load_systems(cfg.data.systems, ckpt["type_map"])
    model = DeepPotModel.load(model_dir, device="cpu")
    rep = evaluate_model(model, systems, only_val=True)
    t = rep["total"]
    log(f"validation ({t['frames']} held-out frames): energy RMSE {t['energy_rmse_per_atom'] * 1000:.3f} meV/atom, "
        f"force RMSE {t['force_rmse']:.4f} eV/A")
    return t


def self_check(model_dir: Path, ckpt: dict, nframes: int, log=print) -> dict:
    """Exported model (onnxruntime, as served) against torch float64 on validation frames."""
    cfg = config_from_dict(ckpt["config"])
    type_map = ckpt["type_map"]
    systems, _ = load_systems(cfg.data.systems, type_map)
    split = {system_key(k): v for k, v in ckpt["split"].items()}
    model = DeepPotModel.load(model_dir, device="cpu")
    net64 = load_checkpoint_net(ckpt, torch.float64)
    _, desc = descriptor_from_config(cfg.descriptor, type_map)
    bias = np.asarray(ckpt["energy_bias"])
    max_de, max_df, n = 0.0, 0.0, 0
    per_system = max(1, nframes // max(len(systems), 1))
    for s in systems:
        val = split.get(system_key(s.name), [[], list(range(s.nframes))])[1][:per_system]
        if not val:
            continue
        frames = prepare_system_frames(desc, s, val, bias)
        for f_idx, fr in zip(val, frames, strict=True):
            b = collate([fr], len(type_map), torch.float64)
            with torch.no_grad():
                e_t, f_t, _ = forward(net64, b, len(type_map), need_virial=False)
            e_t = float(e_t[0]) + float(bias[s.types].sum())
            cell = s.cells[f_idx] if s.cells is not None else None
            res = model.predict([Frame(s.types, s.coords[f_idx], cell, s.pbc)])[0]
            max_de = max(max_de, abs(res["energy"] - e_t) / len(s.types))
            max_df = max(max_df, float(np.abs(res["forces"] - f_t.numpy()).max()))
            n += 1
    out = {"frames": n, "max_energy_diff_per_atom_eV": max_de, "max_force_diff_eV_per_A": max_df}
    log(f"export check (onnxruntime vs torch float64, {n} validation frames): "
        f"max |dE|/atom {max_de:.2e} eV, max |dF| {max_df:.2e} eV/A")
    return out
