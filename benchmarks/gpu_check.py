"""GPU check of the service: start it on CUDA, compare its answers with the CPU ones, print atoms per second.

    bash benchmarks/gpu_check.sh [--store model_store] [--sizes 192 12288 98304]

For every model of the store that knows O and H: the water box (192 atoms, tiled to the given sizes) is
evaluated in this process on the CPU provider (reference), then posted as msgpack to the service started
with DPSERVE_DEVICE=cuda (which must report CUDAExecutionProvider in GET /models). Energies per atom,
forces and virials must agree within float tolerance (float32 graphs: GPU and CPU kernels round
differently). Prints and writes benchmarks/results/gpu_check.json. ``--device cpu`` runs the same script
without a GPU (a dry run of the script itself).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import httpx
import msgpack
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.inference.model import DeepPotModel, Frame  # noqa: E402
from app.schemas import raw_array  # noqa: E402
from benchmarks.bench_service import Server, water_box  # noqa: E402

TOL_E = 1e-5  # eV/atom
TOL_F = 1e-4  # relative to max |F|


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", type=Path, default=ROOT / "model_store")
    p.add_argument("--sizes", type=int, nargs="+", default=[192, 12288, 98304])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check.json")
    args = p.parse_args(argv)
    store = args.store.resolve()
    if args.device == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            print(f"no CUDAExecutionProvider in onnxruntime {ort.__version__}: {ort.get_available_providers()}")
            return 2
    os.environ["DPSERVE_DEVICE"] = args.device
    rows, ok = [], True
    import tempfile

    with Server(store, Path(tempfile.gettempdir()) / "dpserve-gpu-check.log") as server:
        models = httpx.get(server.url + "/models", timeout=30).json()["models"]
        for m in (m for m in models if {"O", "H"} <= set(m["type_map"])):
            spec = f"{m['name']}/{m['version']}"
            print(f"{spec}: server providers {m['providers']}", flush=True)
            if args.device == "cuda" and m["providers"][0] != "CUDAExecutionProvider":
                print("  the server is not on CUDA")
                ok = False
                continue
            cpu = DeepPotModel.load(store / m["name"] / m["version"], device="cpu")
            index = {e: t for t, e in enumerate(cpu.type_map)}
            with httpx.Client(base_url=server.url, timeout=600, headers={
                    "content-type": "application/msgpack", "accept": "application/msgpack"}) as c:
                for n in args.sizes:
                    box = water_box(n)
                    ref = cpu.predict([Frame(np.array([index[s] for s in box["species"]]), box["positions"],
                                             box["cell"], np.ones(3, bool))])[0]
                    body = msgpack.packb({"model": spec, "frames": [{"species": box["species"], "positions": raw_array(
                        box["positions"]), "cell": raw_array(box["cell"])}]}, use_bin_type=True)
                    times = []
                    for _ in range(args.repeats + 1):  # the first call warms up the CUDA kernels
                        t0 = time.perf_counter()
                        r = c.post("/predict", content=body)
                        r.raise_for_status()
                        times.append(time.perf_counter() - t0)
                    res = msgpack.unpackb(r.content)["results"][0]
                    forces = np.frombuffer(res["forces"]["data"], "<f8").reshape(res["forces"]["shape"])
                    de = abs(res["energy"] - ref["energy"]) / n
                    df = float(np.abs(forces - ref["forces"]).max() / max(np.abs(ref["forces"]).max(), 1e-12))
                    dv = float(np.abs(np.array(res["virial"]) - ref["virial"]).max() / max(np.abs(ref["virial"]).max(), 1e-12))
                    t = statistics.median(times[1:])
                    good = de <= TOL_E and df <= TOL_F and dv <= TOL_F
                    ok &= good
                    rows.append({"model": spec, "natoms": n, "http_s": t, "atoms_per_second": n / t,
                                 "energy_diff_ev_per_atom": de, "force_rel_diff": df, "virial_rel_diff": dv, "ok": good})
                    print(f"  {n:>6} atoms: {t:.3f} s over HTTP, {n / t:,.0f} atoms/s; vs CPU: dE {de:.2e} eV/atom, "
                          f"dF {df:.2e}, dXi {dv:.2e} {'OK' if good else 'MISMATCH'}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": args.device, "store": str(store), "rows": rows, "ok": ok}, indent=2) + "\n")
    print("all answers equal the CPU ones within tolerance" if ok else "MISMATCH or not on CUDA: see above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
