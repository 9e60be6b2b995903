"""What an MD step through ASE costs over HTTP, against the bare /predict call it makes (issue 5).

    python benchmarks/bench_md_step.py [--store model_store] [--steps 300] [--out benchmarks/results/md_step.json]

uvicorn runs in a subprocess on 127.0.0.1 (as in bench_service.py). For each water model of the store (latest
version) and the 192-atom water box:

* bare: ``POST /predict`` of a prebuilt msgpack body (raw float64 arrays, what the calculator sends), over
  one keep-alive httpx connection, the answer decoded to numpy: the least any client has to do;
* MD step: one velocity-Verlet step (0.5 fs) of ASE with ``app.client.DPServeCalculator`` (msgpack): ASE's
  integrator, the calculator's encoding and decoding and one request per step;

alternating in blocks so both see the same machine load. Reports medians and the ratio [MD step <= 1.5x the
bare call]. Writes the JSON and a Markdown table next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import httpx
import msgpack
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_service as bs  # noqa: E402

from app.schemas import raw_array  # noqa: E402

TARGET_RATIO = 1.5


def _atoms():
    from ase import Atoms

    box = bs.water_box(192)
    return Atoms(box["species"], positions=box["positions"], cell=box["cell"], pbc=True)


def measure(url: str, model: str, steps: int, block: int = 20) -> dict:
    from ase import units
    from ase.md.velocitydistribution import Stationary, thermalize_momenta
    from ase.md.verlet import VelocityVerlet

    from app.client import DPServeCalculator

    atoms = _atoms()
    body = msgpack.packb({"model": model, "properties": ["energy", "forces", "virial"], "frames": [
        {"species": atoms.get_chemical_symbols(), "positions": raw_array(atoms.positions),
         "cell": raw_array(np.asarray(atoms.cell)), "pbc": [True, True, True]}]}, use_bin_type=True)
    atoms.calc = DPServeCalculator(url=url, model=model, encoding="msgpack")
    thermalize_momenta(atoms, temperature_K=300, rng=np.random.default_rng(0))
    Stationary(atoms)
    dyn = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    bare, md = [], []
    with httpx.Client(base_url=url, timeout=bs.TIMEOUT,
                      headers={"content-type": "application/msgpack", "accept": "application/msgpack"}) as c:

        def one_bare():
            t0 = time.perf_counter()
            r = c.post("/predict", content=body)
            r.raise_for_status()
            res = msgpack.unpackb(r.content, raw=False)["results"][0]
            np.frombuffer(res["forces"]["data"], dtype="<f8").reshape(res["forces"]["shape"])
            return time.perf_counter() - t0

        for _ in range(5):  # warm up both paths
            one_bare()
            dyn.run(1)
        while len(md) < steps:
            for _ in range(block):
                bare.append(one_bare())
            for _ in range(block):
                t0 = time.perf_counter()
                dyn.run(1)
                md.append(time.perf_counter() - t0)
    b, m = float(np.median(bare)) * 1e3, float(np.median(md)) * 1e3
    return {"model": model, "atoms": 192, "steps": len(md), "bare_p50_ms": b, "md_step_p50_ms": m,
            "bare_p95_ms": float(np.percentile(bare, 95)) * 1e3, "md_step_p95_ms": float(np.percentile(md, 95)) * 1e3,
            "ratio": m / b, "target_ratio": TARGET_RATIO, "meets_target": m / b <= TARGET_RATIO}


def markdown(res: dict) -> str:
    out = ["# An ASE MD step over HTTP vs the bare /predict call (192-atom water)", "",
           f"{res['machine']['cpus']} CPUs, load average at start {res['machine']['loadavg']}, {res['date']}; "
           f"`python benchmarks/bench_md_step.py --steps {res['steps']}`.", "",
           "| model | bare /predict p50 ms | ASE step p50 ms | ratio | goal |", "|---|---:|---:|---:|---|"]
    for r in res["results"]:
        out.append(f"| {r['model']} | {r['bare_p50_ms']:.2f} | {r['md_step_p50_ms']:.2f} | {r['ratio']:.2f} | "
                   f"<= {TARGET_RATIO} {'met' if r['meets_target'] else 'missed'} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, default=ROOT / "model_store")
    p.add_argument("--steps", type=int, default=300, help="MD steps (and bare calls) per model")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "md_step.json")
    args = p.parse_args(argv)
    res = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": args.steps,
           "machine": {"cpus": os.cpu_count(), "loadavg": [round(x, 2) for x in os.getloadavg()],
                       "python": platform.python_version()}, "results": []}
    with tempfile.TemporaryDirectory() as tmp, bs.Server(args.store, Path(tmp) / "server.log") as server:
        models = httpx.get(server.url + "/models").json()["models"]
        water = [m for m in bs.latest_versions(models) if set(m["type_map"]) == {"O", "H"}]
        for m in water:
            r = measure(server.url, f"{m['name']}/{m['version']}", args.steps)
            print(f"{r['model']}: bare {r['bare_p50_ms']:.2f} ms, ASE step {r['md_step_p50_ms']:.2f} ms "
                  f"(x{r['ratio']:.2f})", flush=True)
            res["results"].append(r)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    args.out.with_suffix(".md").write_text(markdown(res))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
