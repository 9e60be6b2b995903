"""The prediction service over HTTP, end to end: uvicorn in a subprocess on 127.0.0.1, real clients.

    python benchmarks/bench_service.py [--store model_store] [--quick] [--out benchmarks/results/service.json]

Three measurements (issue 4's performance targets in brackets):

1. Latency of one 192-atom water frame (frame 0 of water/data_0, periodic), JSON over a keep-alive
   connection, one request at a time, for every model of the store that knows O and H: p50 / p95 / mean
   [p50 <= 5 ms loc_frame, <= 20 ms se_e2_a].
2. Large systems: the water box tiled to 12288 and 98304 atoms (--quick: 1536 and 12288), sent as msgpack
   with raw float64 arrays, versus ``DeepPotModel.predict`` of the same frame in this process (the same
   computation without HTTP); the server's resident memory (VmRSS, and VmHWM = its peak so far)
   [HTTP <= 1.25x in-process; cost per atom flat within 1.3x; server memory at 98304 atoms <= 4 GB].
3. Many small molecules: 64 concurrent keep-alive clients (asyncio streams), each sending one 7-atom C1H4O2 molecule
   (nopbc_combustion/C1H4O2, type_map C H O) per request for a fixed time, versus GET /health at the same
   concurrency [predict throughput >= 0.5x /health throughput]. Needs a model that knows C, H and O; if
   the store has none, a water molecule on the first water model stands in (and the report says so).

The server runs with the store's settings defaults (DPSERVE_* variables of this environment pass through).
Request counts and durations are bounded; every request has a timeout. Writes the JSON and a Markdown
table next to it (same name, .md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import msgpack
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.inference.model import DeepPotModel, Frame  # noqa: E402
from app.schemas import raw_array  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
if not SHARED.is_dir():
    SHARED = Path("/work/shared/data")
WATER = SHARED / "water" / "data_0"
C1H4O2 = SHARED / "nopbc_combustion" / "C1H4O2"

TARGET_P50_MS = {"loc_frame": 5.0, "se_e2_a": 20.0}
TARGET_HTTP_RATIO = 1.25
TARGET_FLATNESS = 1.3
TARGET_RSS_GB = 4.0
TARGET_SMALL_VS_HEALTH = 0.5
TIMEOUT = httpx.Timeout(600.0, connect=10.0)


# -- data ----------------------------------------------------------------------------------------------------
def water_box(natoms: int = 192) -> dict:
    """Water frame 0 tiled n x n x n to natoms = 192 n^3: species, positions (N, 3), cell (3, 3)."""
    coord = np.load(WATER / "set.000" / "coord.npy")[0].astype(np.float64).reshape(-1, 3)
    cell = np.load(WATER / "set.000" / "box.npy")[0].astype(np.float64).reshape(3, 3)
    type_map = (WATER / "type_map.raw").read_text().split()
    species = [type_map[t] for t in np.loadtxt(WATER / "type.raw", dtype=int)]
    n = round((natoms / len(coord)) ** (1 / 3))
    if len(coord) * n**3 != natoms:
        raise SystemExit(f"size {natoms} is not 192 n^3")
    shifts = np.array([[a, b, c] for a in range(n) for b in range(n) for c in range(n)], dtype=np.float64)
    positions = (coord[None] + (shifts @ cell)[:, None]).reshape(-1, 3)
    return {"species": species * n**3, "positions": positions, "cell": cell * n}


def small_molecule() -> dict:
    """Frame 0 of nopbc_combustion/C1H4O2: 7 atoms, isolated."""
    coord = np.load(C1H4O2 / "set.000" / "coord.npy")[0].astype(np.float64).reshape(-1, 3)
    type_map = (C1H4O2 / "type_map.raw").read_text().split()
    species = [type_map[t] for t in np.loadtxt(C1H4O2 / "type.raw", dtype=int)]
    return {"species": species, "positions": coord}


WATER_MOLECULE = {"species": ["O", "H", "H"], "positions": np.array([[0.0, 0, 0], [0.7572, 0.5865, 0], [-0.7572, 0.5865, 0]])}


def as_json_frame(f: dict) -> dict:
    out = {"species": f["species"], "positions": f["positions"].tolist()}
    if "cell" in f:
        out["cell"] = f["cell"].tolist()
    return out


# -- server --------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn app.main:app on 127.0.0.1 in a subprocess, for the duration of a with block."""

    def __init__(self, store: Path, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # as `dpserve serve` and the Docker image run it (glibc arenas: see app/cli.py)
        env = {"MALLOC_ARENA_MAX": "2", **os.environ, "DPSERVE_MODEL_STORE": str(store)}
        self.log = open(log, "w")  # noqa: SIM115 (closed in __exit__)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(self.port),
             "--no-access-log", "--log-level", "warning"],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def __enter__(self):
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                r = httpx.get(self.url + "/ready", timeout=2)
                if r.status_code == 200:
                    return self
                if r.status_code == 503 and "no model" in r.text:
                    raise SystemExit(f"the server loaded no model: {r.text}")
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise SystemExit("the server did not become ready within 180 s")

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def memory_mb(self) -> dict:
        """VmRSS (now) and VmHWM (peak so far) of the server process plus its model child processes, MB
        (the peaks are summed: an upper bound of their peak together)."""
        out = {"VmRSS": 0.0, "VmHWM": 0.0}
        for pid in [self.proc.pid, *_children(self.proc.pid)]:
            try:
                lines = Path(f"/proc/{pid}/status").read_text().splitlines()
            except OSError:
                continue
            for line in lines:
                key, _, value = line.partition(":")
                if key in out:
                    out[key] += int(value.split()[0]) / 1024
        return out


# -- 1. latency ----------------------------------------------------------------------------------------------
def latency(url: str, model: str, n: int, warmup: int) -> dict:
    body = json.dumps({"model": model, "frames": [as_json_frame(water_box(192))]}).encode()
    times = []
    with httpx.Client(base_url=url, timeout=TIMEOUT, headers={"content-type": "application/json"}) as c:
        for k in range(warmup + n):
            t0 = time.perf_counter()
            r = c.post("/predict", content=body)
            r.raise_for_status()
            r.json()
            if k >= warmup:
                times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1e3
    return {"requests": n, "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "mean_ms": float(ms.mean()), "min_ms": float(ms.min())}


# -- 2. large systems ----------------------------------------------------------------------------------------
def large(server: Server, store: Path, model: dict, sizes: list[int], repeats: int) -> list[dict]:
    name, version = model["name"], model["version"]
    local = DeepPotModel.load(store / name / version)
    index = {e: t for t, e in enumerate(local.type_map)}
    rows = []
    with httpx.Client(base_url=server.url, timeout=TIMEOUT,
                      headers={"content-type": "application/msgpack", "accept": "application/msgpack"}) as c:
        for natoms in sizes:
            box = water_box(natoms)
            body = msgpack.packb({"model": f"{name}/{version}", "properties": ["energy", "forces", "virial"], "frames": [
                {"species": box["species"], "positions": raw_array(box["positions"]), "cell": raw_array(box["cell"])}]},
                use_bin_type=True)
            http = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                r = c.post("/predict", content=body)
                r.raise_for_status()
                res = msgpack.unpackb(r.content, raw=False)["results"][0]
                np.frombuffer(res["forces"]["data"], dtype="<f8").reshape(res["forces"]["shape"])
                http.append(time.perf_counter() - t0)
            mem = server.memory_mb()
            frame = Frame(types=np.array([index[s] for s in box["species"]]), positions=box["positions"],
                          cell=box["cell"], pbc=np.ones(3, dtype=bool))
            inproc = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                ref = local.predict([frame])[0]
                inproc.append(time.perf_counter() - t0)
            de = abs(res["energy"] - ref["energy"]) / natoms
            t_http, t_in = statistics.median(http), statistics.median(inproc)
            rows.append({"model": f"{name}/{version}", "natoms": natoms, "http_s": t_http, "inprocess_s": t_in,
                         "ratio": t_http / t_in, "http_us_per_atom": t_http / natoms * 1e6,
                         "inprocess_us_per_atom": t_in / natoms * 1e6, "body_mb": len(body) / 2**20,
                         "server_rss_mb": mem.get("VmRSS"), "server_peak_rss_mb": mem.get("VmHWM"),
                         "energy_diff_ev_per_atom": de})
            print(f"  {name} {natoms:>6} atoms: HTTP {t_http:.3f} s, in-process {t_in:.3f} s (x{t_http / t_in:.2f}), "
                  f"server peak RSS {mem.get('VmHWM', 0):.0f} MB", flush=True)
    return rows


# -- 3. many small molecules ---------------------------------------------------------------------------------
async def _hammer(port: int, request: bytes, clients: int, seconds: float) -> dict:
    """``clients`` keep-alive connections, each sending ``request`` again as soon as the answer is in, for
    ``seconds``. A minimal HTTP/1.1 client on asyncio streams: httpx costs more CPU per request than the
    server's /health, so with it the client, not the server, would be measured."""

    async def exchange(reader, writer) -> bool:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        await reader.readexactly(length)
        return head[9:12] == b"200"

    done = errors = 0
    latencies: list[float] = []
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(clients)]
    await asyncio.gather(*(exchange(r, w) for r, w in conns))  # warm up
    deadline = time.perf_counter() + seconds

    async def worker(reader, writer):
        nonlocal done, errors
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            ok = await exchange(reader, writer)
            latencies.append(time.perf_counter() - t0)
            done += ok
            errors += not ok

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(r, w) for r, w in conns))
    elapsed = time.perf_counter() - t0
    for _, w in conns:
        w.close()
    lat = np.array(latencies) * 1e3
    return {"requests": done, "errors": errors, "seconds": elapsed, "per_second": done / elapsed,
            "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95))}


def _http(method: str, path: str, body: bytes = b"") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return (head + "\r\n").encode() + body


def _tasks(pid: int | None) -> list[str]:
    """The thread ids of process ``pid`` (Linux /proc; empty elsewhere or when it is gone)."""
    if pid is None:
        return []
    try:
        return os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []


def _thread_cpu(pid: int | None) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of process ``pid`` (Linux /proc; empty elsewhere)."""
    out: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in _tasks(pid):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def _children(pid: int | None) -> list[int]:
    """The child processes of ``pid`` (the model processes of app.inference.procworker), Linux /proc."""
    out: list[int] = []
    for tid in _tasks(pid):
        try:
            out += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:
            continue
    return out


def _process_cpu(pids: list[int]) -> dict[int, float]:
    return {pid: sum(_thread_cpu(pid).values()) for pid in pids}


def _cpu_per_request(pid: int | None, run) -> dict:
    """Run ``run()`` (a _hammer) and split the CPU it cost per answered request: the server's event loop
    (its main thread), the server's other threads (model worker, onnxruntime and numba pools), its model
    child processes (all their threads) and this benchmark's client, in microseconds."""
    kids = _children(pid)
    t0, k0, c0 = _thread_cpu(pid), _process_cpu(kids), time.process_time()
    res = run()
    t1, k1, c1 = _thread_cpu(pid), _process_cpu(kids), time.process_time()
    n = max(res["requests"], 1)
    loop = t1.get(pid, 0.0) - t0.get(pid, 0.0) if pid is not None else float("nan")
    others = sum(v - t0.get(tid, 0.0) for tid, v in t1.items() if tid != pid) if pid is not None else float("nan")
    model_procs = sum(k1[k] - k0[k] for k in kids) if pid is not None else float("nan")
    res["cpu_us_per_request"] = {"server_event_loop": 1e6 * loop / n, "server_other_threads": 1e6 * others / n,
                                 "model_processes": 1e6 * model_procs / n, "client": 1e6 * (c1 - c0) / n}
    return res


def small_molecules(port: int, model: str, frame: dict, clients: int, seconds: float, pid: int | None = None) -> dict:
    body = json.dumps({"model": model, "frames": [as_json_frame(frame)]}).encode()
    # steady state first: under DPSERVE_MODEL_PROCESS=auto the model's child process starts at the first
    # concurrent call (a few seconds; the worker thread answers meanwhile)
    asyncio.run(_hammer(port, _http("POST", "/predict", body), clients, min(seconds, 5.0)))
    pred = _cpu_per_request(pid, lambda: asyncio.run(_hammer(port, _http("POST", "/predict", body), clients, seconds)))
    health = _cpu_per_request(pid, lambda: asyncio.run(_hammer(port, _http("GET", "/health"), clients, seconds)))
    return {"model": model, "atoms_per_frame": len(frame["species"]), "clients": clients, "predict": pred,
            "health": health, "ratio": pred["per_second"] / health["per_second"],
            "atoms_per_second": pred["per_second"] * len(frame["species"])}


# -- report --------------------------------------------------------------------------------------------------
def markdown(res: dict) -> str:
    out = [f"# Service benchmark ({'quick' if res['quick'] else 'full'})", "",
           f"{res['machine']['cpus']} CPUs, load average at start {res['machine']['loadavg']}, "
           f"store `{res['store']}`, {res['date']}.", "",
           "## One 192-atom water frame, JSON, one request at a time", "",
           "| model | descriptor | p50 ms | p95 ms | mean ms | target p50 |", "|---|---|---|---|---|---|"]
    for r in res["latency"]:
        tgt = TARGET_P50_MS.get(r["descriptor"])
        ok = "" if tgt is None else (f"<= {tgt:g} ms " + ("(met)" if r["p50_ms"] <= tgt else "(missed)"))
        out.append(f"| {r['model']} | {r['descriptor']} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['mean_ms']:.2f} | {ok} |")
    out += ["", "## Large water boxes, msgpack over HTTP vs in-process predict", "",
            "| model | atoms | HTTP s | in-process s | ratio | HTTP us/atom | server peak RSS MB |",
            "|---|---|---|---|---|---|---|"]
    for r in res["large"]:
        out.append(f"| {r['model']} | {r['natoms']} | {r['http_s']:.3f} | {r['inprocess_s']:.3f} | {r['ratio']:.2f} | "
                   f"{r['http_us_per_atom']:.1f} | {r['server_peak_rss_mb']:.0f} |")
    for m, f in res["flatness"].items():
        out.append(f"\nCost per atom over HTTP, largest/smallest size, {m}: {f:.2f} (target <= {TARGET_FLATNESS}).")
    out += [f"\nTargets: HTTP <= {TARGET_HTTP_RATIO}x in-process; server memory at 98304 atoms <= {TARGET_RSS_GB} GB.", ""]
    s = res["small"]
    if s:
        out += ["## Many small molecules: 64 concurrent clients, one frame per request", "",
                "| endpoint | requests/s | p50 ms | p95 ms | errors |", "|---|---|---|---|---|",
                f"| POST /predict ({s['model']}, {s['atoms_per_frame']} atoms) | {s['predict']['per_second']:.0f} | "
                f"{s['predict']['p50_ms']:.1f} | {s['predict']['p95_ms']:.1f} | {s['predict']['errors']} |",
                f"| GET /health | {s['health']['per_second']:.0f} | {s['health']['p50_ms']:.1f} | "
                f"{s['health']['p95_ms']:.1f} | {s['health']['errors']} |", "",
                f"predict / health throughput: {s['ratio']:.2f} (target >= {TARGET_SMALL_VS_HEALTH}); "
                f"{s['atoms_per_second']:.0f} atoms/s.{' ' + s['note'] if s.get('note') else ''}", ""]
        if "cpu_us_per_request" in s["predict"]:
            out += ["CPU per answered request, microseconds (server threads from /proc; the model worker and the "
                    "onnxruntime and numba pools are the 'other threads'; the model processes are the children "
                    "of DPSERVE_MODEL_PROCESS):", "",
                    "| endpoint | server event loop | server other threads | model processes | client |",
                    "|---|---|---|---|---|"]
            for what in ("predict", "health"):
                c = s[what]["cpu_us_per_request"]
                out.append(f"| {what} | {c['server_event_loop']:.0f} | {c['server_other_threads']:.0f} | "
                           f"{c.get('model_processes', float('nan')):.0f} | {c['client']:.0f} |")
            out.append("")
    return "\n".join(out)


def latest_versions(models: list[dict]) -> list[dict]:
    """The highest version of each model name (numeric versions compared as numbers)."""
    best: dict[str, dict] = {}
    key = lambda v: (0, int(v), "") if str(v).isdigit() else (1, 0, str(v))  # noqa: E731
    for m in models:
        if m["name"] not in best or key(m["version"]) > key(best[m["name"]]["version"]):
            best[m["name"]] = m
    return sorted(best.values(), key=lambda m: m["name"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", type=Path, default=ROOT / "model_store")
    p.add_argument("--quick", action="store_true", help="small sizes and short runs (a smoke test)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "service.json")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--all-versions", action="store_true", help="every version in the store (default: the latest of each name)")
    args = p.parse_args(argv)
    quick = args.quick
    sizes = [1536, 12288] if quick else [12288, 98304]
    n_latency, warmup = (20, 3) if quick else (200, 10)
    repeats = 1 if quick else 3
    seconds = 3.0 if quick else 10.0
    store = args.store.resolve()
    args.out.parent.mkdir(parents=True, exist_ok=True)

    res = {"quick": quick, "store": str(store), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "machine": {"cpus": os.cpu_count(), "loadavg": [round(x, 2) for x in os.getloadavg()],
                       "platform": platform.platform(), "python": platform.python_version()},
           "latency": [], "large": [], "flatness": {}, "small": None}
    log = Path(tempfile.gettempdir()) / "dpserve-bench-server.log"
    print(f"server log: {log}", flush=True)
    with Server(store, log) as server:
        models = httpx.get(server.url + "/models", timeout=30).json()["models"]
        if not args.all_versions:
            models = latest_versions(models)
        water = [m for m in models if {"O", "H"} <= set(m["type_map"])]
        print(f"server {server.url}: models {[m['name'] + '/' + m['version'] for m in models]}", flush=True)
        for m in water:
            r = latency(server.url, f"{m['name']}/{m['version']}", n_latency, warmup)
            res["latency"].append({"model": f"{m['name']}/{m['version']}", "descriptor": m["descriptor"], **r})
            print(f"  {m['name']}: 192 atoms p50 {r['p50_ms']:.2f} ms, p95 {r['p95_ms']:.2f} ms", flush=True)
        for m in water:
            rows = large(server, store, m, sizes, repeats)
            res["large"] += rows
            res["flatness"][f"{m['name']}/{m['version']}"] = rows[-1]["http_us_per_atom"] / rows[0]["http_us_per_atom"]
        cho = [m for m in models if {"C", "H", "O"} <= set(m["type_map"])]
        if cho:
            m, frame, note = cho[0], small_molecule(), ""
        elif water:
            m, frame = water[0], WATER_MOLECULE
            note = "No C/H/O model in the store: a 3-atom water molecule stands in for C1H4O2."
        else:
            m = None
        if m is not None:
            s = small_molecules(server.port, f"{m['name']}/{m['version']}", frame, args.clients, seconds,
                                pid=server.proc.pid)
            s["note"] = note
            res["small"] = s
            print(f"  small molecules: predict {s['predict']['per_second']:.0f}/s vs health "
                  f"{s['health']['per_second']:.0f}/s (x{s['ratio']:.2f})", flush=True)
        res["server_memory_mb_end"] = server.memory_mb()
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    args.out.with_suffix(".md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
