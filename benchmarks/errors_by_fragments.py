"""Where a model of isolated molecules errs: energy and force RMSE by how many fragments a frame holds.

    python benchmarks/errors_by_fragments.py -m combustion-se [-s ../shared/data/nopbc_combustion]
        [--frames all|val] [--bond 1.9] [--out benchmarks/results/errors_by_fragments.md]

Atoms closer than ``--bond`` Angstrom are bonded; the connected pieces of that graph are a frame's fragments
(one fragment: an intact molecule; more: a reacting or dissociated configuration). The model is evaluated as
`dpserve test` evaluates it (onnxruntime + the serving descriptor). Prints and writes a Markdown table per
system and fragment count: frames, energy RMSE and MAE per atom (meV/atom) and force RMSE (eV/A), with the
training / validation split from the model's manifest marked.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy.sparse.csgraph import connected_components

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.inference.model import DeepPotModel, Frame  # noqa: E402
from training.data import system_key  # noqa: E402
from training.evaluate import _systems, resolve_model_dir  # noqa: E402


def fragments(positions: np.ndarray, bond: float) -> int:
    d = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
    return int(connected_components(d < bond, directed=False)[0])


def analyse(model: DeepPotModel, systems, bond: float, only_val: bool) -> list[dict]:
    split = model.manifest.get("training", {}).get("split", {})
    groups: dict[tuple, list] = defaultdict(list)
    for s in systems:
        types = np.array([model.type_map.index(e) for e in s.type_map])[s.types]
        key = system_key(s.name)
        if only_val and key not in split:
            raise SystemExit(f"model manifest has no training split for system {key}")
        val = set(split.get(key, []))
        frames = sorted(val) if only_val else range(s.nframes)
        for f in frames:
            x = s.coords[f]
            r = model.predict([Frame(types, x, None, None)])[0]
            de = (r["energy"] - s.energies[f]) / len(x)
            df = r["forces"] - s.forces[f]
            groups[(key, fragments(x, bond))].append((de, float((df**2).mean()), f in val))
    rows = []
    for (name, nfrag), v in sorted(groups.items()):
        de = np.array([e for e, _, _ in v])
        f2 = np.array([f for _, f, _ in v])
        rows.append({"system": name, "fragments": nfrag, "frames": len(v), "val_frames": sum(k for _, _, k in v),
                     "e_rmse_mev": 1e3 * float(np.sqrt((de**2).mean())), "e_mae_mev": 1e3 * float(np.abs(de).mean()),
                     "f_rmse": float(np.sqrt(f2.mean()))})
    return rows


def markdown(rows: list[dict], model: str, bond: float, which: str) -> str:
    out = [f"# {model}: errors by fragment count ({which} frames, bonds < {bond:g} A)", "",
           "| system | fragments | frames (held out) | energy RMSE meV/atom | energy MAE meV/atom | force RMSE eV/A |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['system']} | {r['fragments']} | {r['frames']} ({r['val_frames']}) | {r['e_rmse_mev']:.1f} | "
                   f"{r['e_mae_mev']:.1f} | {r['f_rmse']:.3f} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-m", "--model", required=True, help="model directory, or NAME[/VERSION] in the store")
    p.add_argument("-s", "--system", nargs="+", default=[str(ROOT.parent / "shared" / "data" / "nopbc_combustion")])
    p.add_argument("--store", default=str(ROOT / "model_store"))
    p.add_argument("--frames", choices=["all", "val"], default="all")
    p.add_argument("--bond", type=float, default=1.9, help="bond length threshold, Angstrom (default 1.9)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "errors_by_fragments.md")
    args = p.parse_args(argv)
    directory = resolve_model_dir(args.model, args.store)
    model = DeepPotModel.load(directory, device="cpu")
    rows = analyse(model, _systems(args.system), args.bond, args.frames == "val")
    md = markdown(rows, f"{model.name}/{model.version}", args.bond, args.frames)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
