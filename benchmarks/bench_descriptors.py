"""Time everything but the network, per atom: neighbour list, descriptor with its derivative, the VJP of
a random g = dE/d env, and the force and virial assembly, for the water box tiled to several sizes.

    python benchmarks/bench_descriptors.py [--sizes 192 1536 12288 98304] [--kinds se_e2_a loc_frame]
                                           [--chunk-size 4096] [--out benchmarks/results/descriptors.json]

The box is /work/shared/data/water/data_0 frame 0 (192 atoms, cubic 12.4447 A) repeated n x n x n.
Descriptors as trained on water: se_e2_a rcut 6, rcut_smth 0.5, sel [46, 92]; loc_frame rcut 6,
sel_a [16, 32], sel_r [30, 60], axis rule O: two nearest H, H: nearest O and nearest H.

Each (descriptor, size) runs in a fresh subprocess, so its peak resident memory (ru_maxrss, which includes
the interpreter, numpy and the system itself) is an honest figure for that size alone. Large systems are
processed in chunks of centre atoms (``descriptor.chunks``) to bound memory. Reported: the median over
repeats of the wall time (and of the process CPU time, less sensitive to other jobs on a shared machine),
in microseconds per atom, with the share of the neighbour list. The random g is drawn once, outside the
timed region. Writes the JSON and a Markdown table next to it (same name, .md).
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


def worker(kind: str, natoms: int, repeats: int, chunk_size: int) -> dict:
    """One (descriptor, size) in this process; returns timings and memory as a dict."""
    from app.physics.forces import accumulate_forces_virial
    from app.physics.neighbors import neighbor_list

    desc = make_descriptor(kind)
    positions, cell, types = water_box(natoms)
    g_full = np.random.default_rng(0).standard_normal((min(chunk_size, natoms), desc.nslot, 4))
    rss_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    warmup = 1 if natoms <= 12288 else 0
    rows = []
    for rep in range(warmup + repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        nl = neighbor_list(positions, cell, [True] * 3, desc.rcut)
        t_nl = time.perf_counter() - w0
        forces, virial = np.zeros_like(positions), np.zeros((3, 3))
        t_desc = t_vjp = t_asm = 0.0
        chunks = desc.chunks(nl, types, chunk_size)
        while True:
            t = time.perf_counter()
            ch = next(chunks, None)
            t_desc += time.perf_counter() - t
            if ch is None:
                break
            g = g_full[: ch.stop - ch.start]
            t = time.perf_counter()
            dEdr = desc.vjp(ch, g)
            t_vjp += time.perf_counter() - t
            t = time.perf_counter()
            accumulate_forces_virial(ch.slots, ch.start, nl.j, dEdr, forces, virial)
            t_asm += time.perf_counter() - t
            del ch, dEdr
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        npairs = len(nl)
        del nl
        if rep >= warmup:
            rows.append(dict(wall=wall, cpu=cpu, nl=t_nl, desc=t_desc, vjp=t_vjp, asm=t_asm))
    med = {k: float(np.median([r[k] for r in rows])) for k in rows[0]}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return dict(
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
    )


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = [
        f"# Descriptor benchmark ({m['date']})",
        "",
        f"Water box tiled; neighbour list + descriptor and its derivative + VJP + forces/virial (no network). "
        f"Chunks of {m['chunk_size']} centre atoms. {m['machine']}; load average at start {m['loadavg']}. "
        "Wall time is the median over repeats; CPU time counts all threads of the process.",
        "",
        "| descriptor | atoms | pairs/atom | repeats | wall µs/atom (median) | wall µs/atom (best) "
        "| CPU µs/atom | nl | descriptor | VJP | assembly | peak RSS (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["results"]:
        s = r["share"]
        lines.append(
            f"| {r['descriptor']} | {r['natoms']} | {r['pairs_per_atom']:.1f} | {r['repeats']} "
            f"| {r['us_per_atom']:.2f} | {r['best_us_per_atom']:.2f} | {r['cpu_us_per_atom']:.2f} "
            f"| {100 * s['nl']:.0f}% | {100 * s['desc']:.0f}% | {100 * s['vjp']:.0f}% | {100 * s['asm']:.0f}% "
            f"| {r['peak_rss_mb']:.0f} |"
        )
    ok = {True: "met", False: "NOT met"}
    lines += ["", "Targets (issue 2), from 1536 atoms up:", ""]
    for kind, t in result["targets"].items():
        lines.append(
            f"- {kind}: worst {t['max_us_per_atom']:.2f} µs/atom wall median, {t['max_cpu_us_per_atom']:.2f} CPU "
            f"(target <= {TARGET_US_PER_ATOM}: {ok[t['us_per_atom_ok']]}); flatness {t['flatness']:.2f}x wall median, "
            f"{t['flatness_best']:.2f}x wall best, {t['flatness_cpu']:.2f}x CPU (target <= {TARGET_FLATNESS}: "
            f"{ok[t['flatness_ok']]} on wall median); peak {t['peak_gb']:.2f} GB at {t['largest']} atoms "
            f"(target <= {TARGET_PEAK_GB}: {ok[t['peak_ok']]})"
        )
    return "\n".join(lines) + "\n"


def targets(results: list[dict]) -> dict:
    out = {}
    for kind in dict.fromkeys(r["descriptor"] for r in results):
        rs = [r for r in results if r["descriptor"] == kind]
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[192, 1536, 12288, 98304])
    p.add_argument("--kinds", nargs="+", default=["se_e2_a", "loc_frame"], choices=["se_e2_a", "loc_frame"])
    p.add_argument("--chunk-size", type=int, default=4096, help="centre atoms per chunk (bounds memory)")
    p.add_argument(
        "--repeats", type=int, default=None, help="default: 7 up to 1536 atoms, 3 up to 12288, else 2"
    )
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "descriptors.json")
    p.add_argument("--worker", nargs=2, metavar=("KIND", "NATOMS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        kind, natoms = args.worker[0], int(args.worker[1])
        res = worker(kind, natoms, args.repeats or default_repeats(natoms), args.chunk_size)
        print("RESULT " + json.dumps(res))
        return 0

    import vesin

    loadavg = " ".join(f"{x:.1f}" for x in os.getloadavg())
    results = []
    for kind in args.kinds:
        for n in args.sizes:
            cmd = [sys.executable, __file__, "--worker", kind, str(n), "--chunk-size", str(args.chunk_size)]
            if args.repeats:
                cmd += ["--repeats", str(args.repeats)]
            proc = subprocess.run(
                cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
            )
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                print(proc.stdout, proc.stderr, file=sys.stderr)
                raise SystemExit(f"worker {kind} {n} failed with exit code {proc.returncode}")
            r = json.loads(line[0][len("RESULT ") :])
            results.append(r)
            print(
                f"{kind:10s} {n:7d} atoms: {r['us_per_atom']:7.2f} us/atom wall, {r['cpu_us_per_atom']:7.2f} CPU, "
                f"nl {100 * r['share']['nl']:3.0f}%, peak {r['peak_rss_mb']:6.0f} MB",
                flush=True,
            )
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
    except OSError:
        commit = ""
    meta = dict(
        date=time.strftime("%Y-%m-%d %H:%M"),
        commit=commit,
        machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"numpy {np.__version__}, vesin {vesin.__version__}",
        loadavg=loadavg,
        chunk_size=args.chunk_size,
    )
    result = dict(meta=meta, results=results, targets=targets(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    md = markdown(result)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
