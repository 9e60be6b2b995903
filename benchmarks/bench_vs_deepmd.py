"""dpserve over HTTP against deepmd-kit in-process (`DeepPot.eval`), same descriptor, same sizes, one run.

    python benchmarks/bench_vs_deepmd.py --deepmd-python /path/to/venv/bin/python \
        --deepmd-locframe loc.pb --deepmd-se se.pb --deepmd-chos comb.pb [--store model_store] [--quick]

deepmd-kit lives in its own virtual environment (it pins its own TensorFlow / PyTorch); this script runs its
half in a subprocess with that interpreter, alternating with dpserve's half so both see the same machine
load. deepmd-kit's models only need the right descriptor and sizes (speed does not depend on the weights),
so a few training steps and `dp freeze` make them.

Measured (issue 4's targets):
* water box tiled to 192 and 12288 atoms, one frame per call: microseconds per atom-step, deepmd-kit
  `DeepPot.eval` in-process vs dpserve `POST /predict` (msgpack, keep-alive) [dpserve >= 2x faster at 12288];
* 7-atom C1H4O2 molecules: deepmd-kit one per call and 1000 in one batched call (ms per molecule) vs
  dpserve from 64 concurrent clients, one molecule per request [dpserve faster than both].

Writes benchmarks/results/vs_deepmd.json and .md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import msgpack
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_service as bs  # noqa: E402

DEEPMD_SCRIPT = textwrap.dedent(
    """
    import json, sys, time, numpy as np
    from deepmd.infer import DeepPot
    job = json.loads(sys.argv[1])
    dp = DeepPot(job["model"])
    data = np.load(job["npz"])
    coord, cell, atype = data["coord"], data["cell"], data["atype"]
    nf = coord.shape[0]
    for _ in range(job["warmup"]):
        dp.eval(coord[:1], None if cell.size == 0 else cell[:1], atype)
    ts = []
    for _ in range(job["repeats"]):
        t = time.perf_counter()
        dp.eval(coord, None if cell.size == 0 else cell, atype)
        ts.append(time.perf_counter() - t)
    print(json.dumps({"median_s": float(np.median(ts)), "frames": nf, "natoms": int(len(atype))}))
    """
)


def deepmd_eval(python: str, model: str, coord, cell, atype, repeats: int, warmup: int = 2) -> dict:
    npz = Path("/tmp") / f"dpserve_vs_deepmd_{abs(hash((model, coord.shape)))}.npz"
    np.savez(npz, coord=coord, cell=np.zeros(0) if cell is None else cell, atype=atype)
    job = {"model": model, "npz": str(npz), "repeats": repeats, "warmup": warmup}
    r = subprocess.run([python, "-c", DEEPMD_SCRIPT, json.dumps(job)], capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"deepmd-kit eval failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def dpserve_http(url: str, model: str, frame: dict, repeats: int) -> float:
    """Median seconds of one msgpack POST /predict of ``frame`` (raw float64 arrays, keep-alive)."""
    from app.schemas import raw_array

    f = {"species": frame["species"], "positions": raw_array(frame["positions"])}
    if "cell" in frame:
        f["cell"] = raw_array(frame["cell"])
    body = msgpack.packb({"model": model, "frames": [f]}, use_bin_type=True)
    headers = {"content-type": "application/msgpack", "accept": "application/msgpack"}
    ts = []
    with httpx.Client(base_url=url, timeout=bs.TIMEOUT, headers=headers) as c:
        c.post("/predict", content=body).raise_for_status()
        for _ in range(repeats):
            t = time.perf_counter()
            r = c.post("/predict", content=body)
            r.raise_for_status()
            msgpack.unpackb(r.content, raw=False)
            ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--deepmd-python", required=True)
    p.add_argument("--deepmd-locframe", required=True)
    p.add_argument("--deepmd-se", required=True)
    p.add_argument("--deepmd-chos", required=True, help="a deepmd-kit se_e2_a model for C, H, O")
    p.add_argument("--store", type=Path, default=ROOT / "model_store")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "vs_deepmd.json")
    args = p.parse_args(argv)
    sizes = [192, 1536] if args.quick else [192, 12288]
    res = {"sizes": sizes, "water": [], "small": {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with bs.Server(args.store, args.out.with_suffix(".server.log")) as server:
        url = server.url
        for n in sizes:
            frame = bs.water_box(n)
            coord = np.asarray(frame["positions"], dtype=np.float64).reshape(1, -1)
            cell = np.asarray(frame["cell"], dtype=np.float64).reshape(1, 9)
            tmap = {"O": 0, "H": 1}
            atype = np.array([tmap[s] for s in frame["species"]])
            reps = 20 if n <= 1536 else 5
            for kind, dp_model, our_model in (("loc_frame", args.deepmd_locframe, "water-locframe"),
                                              ("se_e2_a", args.deepmd_se, "water-se")):
                d = deepmd_eval(args.deepmd_python, dp_model, coord, cell, atype, reps)
                ours = dpserve_http(url, our_model, frame, reps)
                row = {"descriptor": kind, "atoms": n, "deepmd_us_per_atom": d["median_s"] / n * 1e6,
                       "dpserve_http_us_per_atom": ours / n * 1e6}
                row["speedup"] = row["deepmd_us_per_atom"] / row["dpserve_http_us_per_atom"]
                res["water"].append(row)
                print(json.dumps(row), flush=True)
        mol = bs.small_molecule()
        tmap = {"C": 0, "H": 1, "O": 2}
        atype = np.array([tmap[s] for s in mol["species"]])
        c1 = np.asarray(mol["positions"], dtype=np.float64).reshape(1, -1)
        one = deepmd_eval(args.deepmd_python, args.deepmd_chos, c1, None, atype, 50)
        many = deepmd_eval(args.deepmd_python, args.deepmd_chos, np.repeat(c1, 1000, axis=0), None, atype, 3)
        seconds = 5.0 if args.quick else 15.0
        ours = bs.small_molecules(server.port, "combustion-se", mol, 64, seconds, pid=server.proc.pid)
        res["small"] = {
            "deepmd_one_per_call_ms": one["median_s"] * 1e3,
            "deepmd_batched_1000_ms_per_molecule": many["median_s"] / 1000 * 1e3,
            "dpserve_64_clients": ours,
        }
        print(json.dumps(res["small"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    args.out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
    return 0


def markdown(res: dict) -> str:
    lines = ["# dpserve (HTTP) vs deepmd-kit (in-process DeepPot.eval)", "",
             "| descriptor | atoms | deepmd-kit µs/atom-step | dpserve HTTP µs/atom-step | dpserve speed-up |",
             "|---|---:|---:|---:|---:|"]
    for r in res["water"]:
        lines.append(f"| {r['descriptor']} | {r['atoms']} | {r['deepmd_us_per_atom']:.2f} | "
                     f"{r['dpserve_http_us_per_atom']:.2f} | {r['speedup']:.2f}x |")
    s = res.get("small")
    if s:
        d = s["dpserve_64_clients"]
        rps = d["predict"]["per_second"]
        lines += ["", "7-atom C1H4O2 molecules:", "",
                  f"- deepmd-kit, one per call: {s['deepmd_one_per_call_ms']:.3f} ms per molecule",
                  f"- deepmd-kit, 1000 in one call: {s['deepmd_batched_1000_ms_per_molecule']:.3f} ms per molecule",
                  f"- dpserve, 64 concurrent clients: {rps:.0f} requests/s = "
                  f"{1000 / rps if rps else float('nan'):.3f} ms per molecule "
                  f"(GET /health at the same concurrency: {d['health']['per_second']:.0f}/s)"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
