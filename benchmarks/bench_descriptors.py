"""Time everything but the network, per atom: neighbour list, descriptor with its derivative, the VJP of
a random g = dE/d env, and the force and virial assembly, for the water box tiled to several sizes, on
either physics backend (the numba kernels of app/physics/kernels.py, or the numpy reference).

    python benchmarks/bench_descriptors.py [--backend numba|numpy|both] [--sizes 192 1536 12288 98304]
                                           [--kinds se_e2_a loc_frame] [--chunk-size 8192]
                                           [--predict MODEL_DIR ...] [--predict-sizes 12288]
                                           [--out benchmarks/results/descriptors.json]

The box is /work/shared/data/water/data_0 frame 0 (192 atoms, cubic 12.4447 A) repeated n x n x n.
Descriptors as trained on water: se_e2_a rcut 6, rcut_smth 0.5, sel [46, 92]; loc_frame rcut 6,
sel_a [16, 32], sel_r [30, 60], axis rule O: two nearest H, H: nearest O and nearest H.

Each (backend, descriptor, size) runs in a fresh subprocess, so its peak resident memory (ru_maxrss, which
includes the interpreter, numpy and the system itself) is an honest figure for that size alone. Large
systems are processed in chunks of centre atoms (as DeepPotModel.predict does, default 8192) to bound
memory. Reported: the median over repeats of the wall time (and of the process CPU time, all threads,
less sensitive to other jobs on a shared machine), in microseconds per atom, with the shares of the
neighbour list, the descriptor, the VJP and the assembly (numba: VJP and assembly are one kernel). The
random g is drawn once, outside the timed region. numba kernels are compiled (or loaded from their cache)
before timing.

``--predict MODEL_DIR ...`` also times the whole in-process ``DeepPotModel.predict`` (network included)
on each backend for the water box at ``--predict-sizes``. Writes the JSON and a Markdown table next to
it (same name, .md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "water" / "data_0"
if not DATA.is_dir():
    DATA = Path("/work/shared/data/water/data_0")

TARGET_US_PER_ATOM = 8.0
TARGET_FLATNESS = 1.3  # max / min cost per atom from 1536 atoms up
TARGET_PEAK_GB = 3.0


def default_repeats(natoms: int) -> int:
    return 7 if natoms <= 1536 else 3 if natoms <= 12288 else 2


def water_box(natoms: int):
    """The 192-atom water box tiled n x n x n to ``natoms`` (a multiple of 192 that is 192 n^3)."""
    coord = np.load(DATA / "set.000" / "coord.npy")[0].astype(np.float64).reshape(-1, 3)
    cell = np.load(DATA / "set.000" / "box.npy")[0].astype(np.float64).reshape(3, 3)
    types = np.array((DATA / "type.raw").read_text().split(), dtype=np.int64)
    n = round((natoms / len(coord)) ** (1 / 3))
    if len(coord) * n**3 != natoms:
        raise SystemExit(f"--sizes: {natoms} is not 192 n^3 (allowed: 192, 1536, 12288, 98304, ...)")
    shifts = np.array([[a, b, c] for a in range(n) for b in range(n) for c in range(n)], dtype=np.float64)
    positions = (coord[None, :, :] + (shifts @ cell)[:, None, :]).reshape(-1, 3)
    return positions, cell * n, np.tile(types, n**3)


def make_descriptor(kind: str):
    from app.physics.descriptors import LocFrame, SeA

    if kind == "se_e2_a":
        return SeA(6.0, 0.5, [46, 92])
    if kind == "loc_frame":
        return LocFrame(6.0, [16, 32], [30, 60], [[[1, 0], [1, 1]], [[0, 0], [1, 0]]])
    raise SystemExit(f"unknown descriptor {kind!r}; allowed: se_e2_a, loc_frame")


def _timed(chunks, clock: dict, key: str):
    """Yield from ``chunks``, adding the time spent producing each item (the descriptor work) to clock[key]."""
    while True:
        t = time.perf_counter()
        ch = next(chunks, None)
        clock[key] += time.perf_counter() - t
        if ch is None:
            return
        yield ch


def _time_numpy(desc, positions, cell, types, g_full, chunk_size):
    from app.physics.forces import accumulate_forces_virial
    from app.physics.neighbors import neighbor_list

    w0 = time.perf_counter()
    nl = neighbor_list(positions, cell, [True] * 3, desc.rcut)
    t_nl = time.perf_counter() - w0
    forces, virial = np.zeros_like(positions), np.zeros((3, 3))
    t_vjp = t_asm = 0.0
    clock = {"desc": 0.0}
    for ch in _timed(desc.chunks(nl, types, chunk_size), clock, "desc"):
        g = g_full[: ch.stop - ch.start]
        t = time.perf_counter()
        dEdr = desc.vjp(ch, g)
        t_vjp += time.perf_counter() - t
        t = time.perf_counter()
        accumulate_forces_virial(ch.slots, ch.start, nl.j, dEdr, forces, virial)
        t_asm += time.perf_counter() - t
        del ch, dEdr
    return len(nl), dict(nl=t_nl, desc=clock["desc"], vjp=t_vjp, asm=t_asm)


def _time_numba(desc, positions, cell, types, g_full, chunk_size):
    from app.physics import kernels

    w0 = time.perf_counter()
    pairs = kernels.pair_list(positions, cell, [True] * 3, desc.rcut)
    t_nl = time.perf_counter() - w0
    forces, virial = np.zeros_like(positions), np.zeros((3, 3))
    t_vjp = 0.0
    clock = {"desc": 0.0}
    for ch in _timed(kernels.chunks(desc, pairs, types, chunk_size), clock, "desc"):
        g = g_full[: ch.stop - ch.start]
        t = time.perf_counter()
        kernels.vjp_assemble(ch, g, forces, virial)  # VJP fused with the assembly
        t_vjp += time.perf_counter() - t
        del ch
    return len(pairs), dict(nl=t_nl, desc=clock["desc"], vjp=t_vjp, asm=0.0)


def worker(backend: str, kind: str, natoms: int, repeats: int, chunk_size: int) -> dict:
    """One (backend, descriptor, size) in this process; returns timings and memory as a dict."""
    desc = make_descriptor(kind)
    positions, cell, types = water_box(natoms)
    rng = np.random.default_rng(0)
    if backend == "numba":
        from app.physics import kernels

        kernels.warmup()
        shape = (desc.dim,) if kind == "loc_frame" else (desc.nslot, 4)  # the network's input per atom
        run = _time_numba
    else:
        shape = (desc.nslot, 4)
        run = _time_numpy
    g_full = rng.standard_normal((min(chunk_size, natoms), *shape))
    rss_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    warmup = 1 if natoms <= 12288 else 0
    rows = []
    for rep in range(warmup + repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        npairs, parts = run(desc, positions, cell, types, g_full, chunk_size)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        if rep >= warmup:
            rows.append(dict(wall=wall, cpu=cpu, **parts))
    med = {k: float(np.median([r[k] for r in rows])) for k in rows[0]}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return dict(
        backend=backend,
        descriptor=kind,
        natoms=natoms,
        pairs_per_atom=npairs / natoms,
        repeats=repeats,
        chunk_size=chunk_size,
        median_wall_s=med["wall"],
        median_cpu_s=med["cpu"],
        us_per_atom=1e6 * med["wall"] / natoms,
        best_us_per_atom=1e6 * min(r["wall"] for r in rows) / natoms,
        cpu_us_per_atom=1e6 * med["cpu"] / natoms,
        share={k: med[k] / med["wall"] for k in ("nl", "desc", "vjp", "asm")},
        peak_rss_mb=peak / 1024,
        setup_rss_mb=rss_setup / 1024,
        all_wall_s=[r["wall"] for r in rows],
        all_cpu_s=[r["cpu"] for r in rows],
    )


def predict_worker(backend: str, model_dir: str, natoms: int, repeats: int) -> dict:
    """The whole in-process DeepPotModel.predict (network included) on one backend."""
    from app.inference.model import DeepPotModel, Frame

    model = DeepPotModel.load(model_dir, device="cpu")
    model.physics_backend = backend
    positions, cell, types = water_box(natoms)
    frame = Frame(types, positions, cell, np.ones(3, bool))
    model.predict([frame])  # warm-up (onnxruntime, kernels)
    rows = []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        model.predict([frame])
        rows.append((time.perf_counter() - w0, time.process_time() - c0))
    wall = float(np.median([r[0] for r in rows]))
    cpu = float(np.median([r[1] for r in rows]))
    return dict(
        backend=backend,
        model=f"{model.name}/{model.version}",
        descriptor=model.descriptor.kind,
        natoms=natoms,
        repeats=repeats,
        us_per_atom=1e6 * wall / natoms,
        best_us_per_atom=1e6 * min(r[0] for r in rows) / natoms,
        cpu_us_per_atom=1e6 * cpu / natoms,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = [
        f"# Descriptor benchmark ({m['date']}, commit {m.get('commit', '')})",
        "",
        f"Water box tiled; neighbour list + descriptor and its derivative + VJP + forces/virial (no network). "
        f"Chunks of {m['chunk_size']} centre atoms. {m['machine']}; load average at start {m['loadavg']}. "
        "Wall time is the median over repeats; CPU time (median) counts all threads of the process. "
        "numba: VJP and assembly are one kernel (its share under VJP).",
        "",
        "| backend | descriptor | atoms | pairs/atom | repeats | wall µs/atom (median) | wall µs/atom (best) "
        "| CPU µs/atom | nl | descriptor | VJP | assembly | peak RSS (MB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["results"]:
        s = r["share"]
        lines.append(
            f"| {r.get('backend', 'numpy')} | {r['descriptor']} | {r['natoms']} | {r['pairs_per_atom']:.1f} | {r['repeats']} "
            f"| {r['us_per_atom']:.2f} | {r['best_us_per_atom']:.2f} | {r['cpu_us_per_atom']:.2f} "
            f"| {100 * s['nl']:.0f}% | {100 * s['desc']:.0f}% | {100 * s['vjp']:.0f}% | {100 * s['asm']:.0f}% "
            f"| {r['peak_rss_mb']:.0f} |"
        )
    ok = {True: "met", False: "NOT met"}
    lines += ["", "Targets (issue 2), from 1536 atoms up:", ""]
    for key, t in result["targets"].items():
        lines.append(
            f"- {key}: worst {t['max_us_per_atom']:.2f} µs/atom wall median, {t['max_cpu_us_per_atom']:.2f} CPU "
            f"(target <= {TARGET_US_PER_ATOM}: {ok[t['us_per_atom_ok']]}); flatness {t['flatness']:.2f}x wall median, "
            f"{t['flatness_best']:.2f}x wall best, {t['flatness_cpu']:.2f}x CPU (target <= {TARGET_FLATNESS}: "
            f"{ok[t['flatness_ok']]} on wall median); peak {t['peak_gb']:.2f} GB at {t['largest']} atoms "
            f"(target <= {TARGET_PEAK_GB}: {ok[t['peak_ok']]})"
        )
    if result.get("predict"):
        lines += [
            "",
            "In-process `DeepPotModel.predict` (network included, onnxruntime CPU), median over repeats:",
            "",
            "| backend | model | descriptor | atoms | repeats | wall µs/atom (median) | wall µs/atom (best) | CPU µs/atom | peak RSS (MB) |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in result["predict"]:
            lines.append(
                f"| {r['backend']} | {r['model']} | {r['descriptor']} | {r['natoms']} | {r['repeats']} "
                f"| {r['us_per_atom']:.2f} | {r['best_us_per_atom']:.2f} | {r['cpu_us_per_atom']:.2f} | {r['peak_rss_mb']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def targets(results: list[dict]) -> dict:
    out = {}
    for key in dict.fromkeys((r.get("backend", "numpy"), r["descriptor"]) for r in results):
        rs = [r for r in results if (r.get("backend", "numpy"), r["descriptor"]) == key]
        kind = f"{key[0]} {key[1]}"
        big = [r for r in rs if r["natoms"] >= 1536] or rs
        largest = max(rs, key=lambda r: r["natoms"])

        def spread(key, big=big):
            values = [r[key] for r in big]
            return max(values) / min(values)

        worst = max(r["us_per_atom"] for r in big)
        out[kind] = dict(
            max_us_per_atom=worst,
            max_cpu_us_per_atom=max(r["cpu_us_per_atom"] for r in big),
            us_per_atom_ok=bool(worst <= TARGET_US_PER_ATOM),
            flatness=spread("us_per_atom"),
            flatness_best=spread("best_us_per_atom"),
            flatness_cpu=spread("cpu_us_per_atom"),
            flatness_ok=bool(spread("us_per_atom") <= TARGET_FLATNESS),
            largest=largest["natoms"],
            peak_gb=largest["peak_rss_mb"] / 1024,
            peak_ok=bool(largest["peak_rss_mb"] / 1024 <= TARGET_PEAK_GB),
        )
    return out


def _run_worker(args_list: list[str]) -> dict:
    cmd = [sys.executable, __file__, *args_list]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        print(proc.stdout, proc.stderr, file=sys.stderr)
        raise SystemExit(f"worker {args_list} failed with exit code {proc.returncode}")
    return json.loads(line[0][len("RESULT ") :])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=["numba", "numpy", "both"], default="both")
    p.add_argument("--sizes", type=int, nargs="+", default=[192, 1536, 12288, 98304])
    p.add_argument("--kinds", nargs="+", default=["se_e2_a", "loc_frame"], choices=["se_e2_a", "loc_frame"])
    p.add_argument("--chunk-size", type=int, default=8192, help="centre atoms per chunk (bounds memory)")
    p.add_argument(
        "--repeats", type=int, default=None, help="default: 7 up to 1536 atoms, 3 up to 12288, else 2"
    )
    p.add_argument("--predict", nargs="*", default=[], metavar="MODEL_DIR",
                   help="also time DeepPotModel.predict of these model directories on each backend")
    p.add_argument("--predict-sizes", type=int, nargs="+", default=[12288])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "descriptors.json")
    p.add_argument("--worker", nargs=3, metavar=("BACKEND", "KIND", "NATOMS"), help=argparse.SUPPRESS)
    p.add_argument("--predict-worker", nargs=3, metavar=("BACKEND", "MODEL_DIR", "NATOMS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        backend, kind, natoms = args.worker[0], args.worker[1], int(args.worker[2])
        res = worker(backend, kind, natoms, args.repeats or default_repeats(natoms), args.chunk_size)
        print("RESULT " + json.dumps(res))
        return 0
    if args.predict_worker:
        backend, model_dir, natoms = args.predict_worker[0], args.predict_worker[1], int(args.predict_worker[2])
        res = predict_worker(backend, model_dir, natoms, args.repeats or default_repeats(natoms))
        print("RESULT " + json.dumps(res))
        return 0

    import vesin

    backends = ["numpy", "numba"] if args.backend == "both" else [args.backend]
    loadavg = " ".join(f"{x:.1f}" for x in os.getloadavg())
    extra = ["--chunk-size", str(args.chunk_size)] + (["--repeats", str(args.repeats)] if args.repeats else [])
    results = []
    for kind in args.kinds:
        for backend in backends:
            for n in args.sizes:
                r = _run_worker(["--worker", backend, kind, str(n), *extra])
                results.append(r)
                print(
                    f"{backend:6s} {kind:10s} {n:7d} atoms: {r['us_per_atom']:7.2f} us/atom wall, "
                    f"{r['cpu_us_per_atom']:7.2f} CPU, nl {100 * r['share']['nl']:3.0f}%, peak {r['peak_rss_mb']:6.0f} MB",
                    flush=True,
                )
    predict = []
    for model_dir in args.predict:
        for n in args.predict_sizes:
            for backend in backends:
                r = _run_worker(["--predict-worker", backend, str(model_dir), str(n)]
                                + (["--repeats", str(args.repeats)] if args.repeats else []))
                predict.append(r)
                print(f"predict {backend:6s} {r['model']:20s} {n:7d} atoms: {r['us_per_atom']:7.2f} us/atom wall, "
                      f"{r['cpu_us_per_atom']:7.2f} CPU", flush=True)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
    except OSError:
        commit = ""
    import numba

    meta = dict(
        date=time.strftime("%Y-%m-%d %H:%M"),
        commit=commit,
        machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"numpy {np.__version__}, vesin {vesin.__version__}, numba {numba.__version__} "
        f"({numba.config.NUMBA_NUM_THREADS} threads)",
        loadavg=loadavg,
        loadavg_end=" ".join(f"{x:.1f}" for x in os.getloadavg()),
        chunk_size=args.chunk_size,
    )
    result = dict(meta=meta, results=results, targets=targets(results), predict=predict)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    md = markdown(result)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
