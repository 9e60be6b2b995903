"""Load test: many concurrent clients with mixed request sizes against the service, every answer checked.

    python benchmarks/bench_load.py [--store model_store | --tiny] [--quick] [--duration 60] [--clients 48]

uvicorn serves ``app.main:app`` in a subprocess on 127.0.0.1 (loopback only). ``--clients`` keep-alive
clients (asyncio streams; a minimal HTTP/1.1 client, so that the clients cost little CPU next to the
server) send requests back to back for ``--duration`` seconds (``--quick``: 10 s), each to one of the
store's O/H models in turn:

* most clients: a single water molecule (3 atoms, JSON) or, one time in three, the 192-atom periodic water
  box (JSON);
* ``--big-clients`` clients (default 2): the box tiled to 1536 atoms (msgpack with raw arrays), so a few
  large requests are always in flight.

Every 200 answer is checked against a reference computed once in this process with ``DeepPotModel.predict``
(energy to 1e-6 relative, forces to 1e-6 of the largest force for float64 graphs, 1e-5 for float32). A 503
(queue full, shed at once) is counted and its Retry-After honoured (at most 1 s); anything else is an error.
Meanwhile one more client probes GET /health every 0.25 s, and the server's resident memory with its model
child processes' (psutil if installed, else /proc/<pid>/status VmRSS) is sampled every 0.5 s: the report gives it at the start, its
peak, at the end, and the slope of a straight-line fit over the last two thirds of the run (a leak shows as
a steady positive slope).

Bounded: the run stops after ``--duration`` seconds or ``--max-requests`` requests, each request has a
60 s timeout, and the whole measurement a hard limit of duration + 120 s. ``--max-queue-requests`` passes
DPSERVE_MAX_QUEUE_REQUESTS to the server (shedding shows up sooner with a small queue). ``--tiny`` trains
and serves the two tiny test models (20 training steps each, needs torch) when no shipped models exist.
Writes ``benchmarks/results/load.json`` and ``load.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import orjson

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from bench_service import WATER_MOLECULE, Server, _children, water_box  # noqa: E402

from app.inference.model import DeepPotModel, Frame  # noqa: E402
from app.schemas import raw_array  # noqa: E402

REQUEST_TIMEOUT = 60.0
KINDS = ("molecule", "box192", "box1536")


# -- requests and references ---------------------------------------------------------------------------------
def _frames() -> dict[str, dict]:
    box = water_box(192)
    return {"molecule": WATER_MOLECULE, "box192": box, "box1536": water_box(1536)}


def _http(path: str, body: bytes, content_type: str, accept: str) -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\nAccept: {accept}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def build_requests(models: list[str]) -> dict[tuple[str, str], bytes]:
    """(model, kind) -> the raw HTTP request."""
    out = {}
    for model, (kind, f) in itertools.product(models, _frames().items()):
        if kind == "box1536":  # msgpack with raw float64 arrays, as large-system clients send it
            frame = {"species": f["species"], "positions": raw_array(f["positions"]), "cell": raw_array(f["cell"])}
            body = msgpack.packb({"model": model, "frames": [frame]}, use_bin_type=True)
            out[(model, kind)] = _http("/predict", body, "application/msgpack", "application/msgpack")
        else:
            frame = {"species": f["species"], "positions": np.asarray(f["positions"]).tolist()}
            if "cell" in f:
                frame["cell"] = f["cell"].tolist()
            body = orjson.dumps({"model": model, "frames": [frame]})
            out[(model, kind)] = _http("/predict", body, "application/json", "application/json")
    return out


def references(store: Path, models: list[str]) -> dict[tuple[str, str], dict]:
    """(model, kind) -> {energy, forces, tol} from DeepPotModel.predict in this process."""
    refs = {}
    frames = _frames()
    for spec in models:
        name, version = spec.split("/")
        model = DeepPotModel.load(store / name / version, device="cpu")
        index = {e: t for t, e in enumerate(model.type_map)}
        tol = 1e-6 if model.dtype == np.float64 else 1e-5
        for kind, f in frames.items():
            cell = f.get("cell")
            frame = Frame(types=np.array([index[s] for s in f["species"]]), positions=np.asarray(f["positions"]),
                          cell=cell, pbc=np.ones(3, dtype=bool) if cell is not None else None)
            r = model.predict([frame])[0]
            refs[(spec, kind)] = {"energy": r["energy"], "forces": r["forces"], "tol": tol}
    return refs


def check(answer: dict, ref: dict) -> tuple[bool, float, float]:
    """(correct, relative energy error, force error relative to the largest reference force)."""
    forces = answer["forces"]
    if isinstance(forces, dict):
        forces = np.frombuffer(forces["data"], dtype="<f8").reshape(forces["shape"])
    de = abs(answer["energy"] - ref["energy"]) / max(abs(ref["energy"]), 1e-12)
    df = float(np.abs(np.asarray(forces) - ref["forces"]).max() / max(np.abs(ref["forces"]).max(), 1e-12))
    return de <= 1e-6 and df <= ref["tol"], de, df


# -- a minimal HTTP/1.1 client -------------------------------------------------------------------------------
class Connection:
    def __init__(self, port: int):
        self.port = port
        self.reader = self.writer = None

    async def exchange(self, request: bytes) -> tuple[int, dict, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            self.writer.write(request)
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {}
            for line in lines[1:]:
                k, _, v = line.partition(":")
                if k:
                    headers[k.strip().lower()] = v.strip()
            body = await self.reader.readexactly(int(headers.get("content-length", 0)))
            if headers.get("connection", "").lower() == "close":
                self.close()
            return status, headers, body
        except BaseException:
            self.close()
            raise

    def close(self):
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


# -- the load ------------------------------------------------------------------------------------------------
class Tally:
    def __init__(self):
        self.count = {k: {"200": 0, "503": 0, "other": 0, "wrong": 0} for k in KINDS}
        self.latency = {k: [] for k in KINDS}  # seconds, 200 answers only
        self.shed_latency: list[float] = []
        self.max_de = self.max_df = 0.0
        self.errors: list[str] = []
        self.atoms = 0

    def total(self, key: str) -> int:
        return sum(c[key] for c in self.count.values())


async def client(k: int, port: int, requests: dict, refs: dict, models: list[str], big: bool, stop_at: float,
                 budget: list[int], tally: Tally, natoms: dict):
    rng = random.Random(k)
    conn = Connection(port)
    step = k
    while time.perf_counter() < stop_at and budget[0] > 0:
        budget[0] -= 1
        model = models[step % len(models)]
        step += 1
        kind = "box1536" if big else ("box192" if rng.random() < 1 / 3 else "molecule")
        t0 = time.perf_counter()
        try:
            status, headers, body = await asyncio.wait_for(conn.exchange(requests[(model, kind)]), REQUEST_TIMEOUT)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as e:
            tally.count[kind]["other"] += 1
            tally.errors.append(f"{kind}: {type(e).__name__}: {e}")
            conn.close()
            continue
        dt = time.perf_counter() - t0
        if status == 200:
            answer = (msgpack.unpackb(body, raw=False) if headers.get("content-type") == "application/msgpack"
                      else orjson.loads(body))["results"][0]
            ok, de, df = check(answer, refs[(model, kind)])
            tally.max_de, tally.max_df = max(tally.max_de, de), max(tally.max_df, df)
            tally.count[kind]["200"] += 1
            tally.count[kind]["wrong"] += not ok
            tally.latency[kind].append(dt)
            tally.atoms += natoms[kind]
        elif status == 503:
            tally.count[kind]["503"] += 1
            tally.shed_latency.append(dt)
            await asyncio.sleep(min(float(headers.get("retry-after", 1)), 1.0) * rng.uniform(0.5, 1.0))
        else:
            tally.count[kind]["other"] += 1
            tally.errors.append(f"{kind}: HTTP {status}: {body[:200]!r}")
    conn.close()


async def health_probe(port: int, stop_at: float, out: list[float], failures: list[str]):
    conn = Connection(port)
    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    while time.perf_counter() < stop_at:
        t0 = time.perf_counter()
        try:
            status, _, _ = await asyncio.wait_for(conn.exchange(request), 10)
            if status != 200:
                failures.append(f"/health {status}")
        except (TimeoutError, OSError, asyncio.IncompleteReadError) as e:
            failures.append(f"/health {type(e).__name__}")
        out.append(time.perf_counter() - t0)
        await asyncio.sleep(0.25)
    conn.close()


class MemorySampler(threading.Thread):
    def __init__(self, pid: int, every: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.every, self.samples, self.stopped = pid, every, [], threading.Event()
        try:
            import psutil

            self._proc = psutil.Process(pid)
        except ImportError:
            self._proc = None

    def rss_mb(self) -> float:
        """The server's RSS plus its children's (the model processes of DPSERVE_MODEL_PROCESS)."""
        if self._proc is not None:
            procs = [self._proc]
            with contextlib.suppress(Exception):
                procs += self._proc.children()
            total = 0.0
            for p in procs:
                with contextlib.suppress(Exception):  # a child may be gone between listing and reading
                    total += p.memory_info().rss / 2**20
            return total
        total = 0.0
        for pid in [self.pid, *_children(self.pid)]:
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) / 1024
        return total

    def run(self):
        t0 = time.perf_counter()
        while not self.stopped.is_set():
            try:
                self.samples.append((time.perf_counter() - t0, self.rss_mb()))
            except (OSError, ProcessLookupError):
                return
            self.stopped.wait(self.every)


async def warm_up(port: int, requests: dict) -> None:
    """Every (model, kind) once, one at a time; each must succeed."""
    conn = Connection(port)
    for key, request in requests.items():
        status, _, body = await asyncio.wait_for(conn.exchange(request), REQUEST_TIMEOUT)
        if status != 200:
            raise SystemExit(f"warm-up request {key} got HTTP {status}: {body[:300]!r}")
    conn.close()


async def run_load(port: int, requests, refs, models, clients: int, big_clients: int, duration: float,
                   max_requests: int, natoms: dict) -> tuple[Tally, list[float], list[str], float]:
    tally, health, health_failures = Tally(), [], []
    budget = [max_requests]
    t0 = time.perf_counter()
    stop_at = t0 + duration
    tasks = [client(k, port, requests, refs, models, k < big_clients, stop_at, budget, tally, natoms)
             for k in range(clients)]
    await asyncio.wait_for(asyncio.gather(*tasks, health_probe(port, stop_at, health, health_failures)),
                           duration + 120)
    return tally, health, health_failures, time.perf_counter() - t0


# -- report --------------------------------------------------------------------------------------------------
def _pct(xs, q):
    return float(np.percentile(np.array(xs) * 1e3, q)) if xs else float("nan")


def summarise(tally: Tally, health, health_failures, elapsed, samples, res: dict) -> dict:
    kinds = {}
    all_lat = [x for k in KINDS for x in tally.latency[k]]
    for k in KINDS:
        kinds[k] = {**tally.count[k], "p50_ms": _pct(tally.latency[k], 50), "p99_ms": _pct(tally.latency[k], 99)}
    t = np.array([s[0] for s in samples])
    rss = np.array([s[1] for s in samples])
    tail = t >= t[-1] / 3 if len(t) else t
    slope = float(np.polyfit(t[tail], rss[tail], 1)[0] * 60) if tail.sum() >= 3 else float("nan")
    res.update({
        "seconds": elapsed,
        "requests": {"200": tally.total("200"), "503": tally.total("503"), "other": tally.total("other"),
                     "wrong": tally.total("wrong")},
        "per_kind": kinds,
        "all_200": {"p50_ms": _pct(all_lat, 50), "p99_ms": _pct(all_lat, 99),
                    "per_second": len(all_lat) / elapsed, "atoms_per_second": tally.atoms / elapsed},
        "shed": {"count": len(tally.shed_latency), "p50_ms": _pct(tally.shed_latency, 50),
                 "p99_ms": _pct(tally.shed_latency, 99)},
        "max_energy_rel_error": tally.max_de, "max_force_rel_error": tally.max_df,
        "health": {"probes": len(health), "failures": len(health_failures), "p50_ms": _pct(health, 50),
                   "max_ms": float(np.max(health) * 1e3) if health else float("nan")},
        "rss_mb": {"start": float(rss[0]) if len(rss) else None, "peak": float(rss.max()) if len(rss) else None,
                   "end": float(rss[-1]) if len(rss) else None, "slope_mb_per_min_last_two_thirds": slope,
                   "samples": [[round(a, 2), round(b, 1)] for a, b in samples]},
        "errors_sample": tally.errors[:20],
    })
    return res


def markdown(res: dict) -> str:
    r, m = res["requests"], res["rss_mb"]
    shed = (f"Sheds (503) answered in p50 {res['shed']['p50_ms']:.1f} ms, p99 {res['shed']['p99_ms']:.1f} ms."
            if res["shed"]["count"] else "No request was shed.")
    short = ("; a run this short shows the ramp-up to the working set, not a trend: run without --quick to judge "
             "a leak" if res["seconds"] < 30 else "")
    out = [f"# Load test ({'quick' if res['quick'] else 'full'}): {res['clients']} clients, {res['seconds']:.0f} s",
           "",
           f"{res['machine']['cpus']} CPUs, load average at start {res['machine']['loadavg']}; models "
           f"{', '.join(res['models'])}; server queue limit "
           f"{res['max_queue_requests'] or 'default (256)'} requests per model; {res['date']}.", "",
           "| requests | 200 | 503 (shed) | other | wrong answers | p50 ms | p99 ms |", "|---|---|---|---|---|---|---|"]
    names = {"molecule": "1 water molecule (3 atoms, JSON)", "box192": "192-atom water box (JSON)",
             "box1536": "1536-atom water box (msgpack)"}
    for k in KINDS:
        c = res["per_kind"][k]
        out.append(f"| {names[k]} | {c['200']} | {c['503']} | {c['other']} | {c['wrong']} | {c['p50_ms']:.1f} | "
                   f"{c['p99_ms']:.1f} |")
    a = res["all_200"]
    out += [f"| **all** | **{r['200']}** | **{r['503']}** | **{r['other']}** | **{r['wrong']}** | {a['p50_ms']:.1f} | "
            f"{a['p99_ms']:.1f} |", "",
            f"Throughput: {a['per_second']:.1f} answers/s, {a['atoms_per_second']:.0f} atoms/s. {shed} "
            f"Largest deviation from the in-process reference: energy "
            f"{res['max_energy_rel_error']:.1e} relative, forces {res['max_force_rel_error']:.1e} of the largest force.",
            "",
            f"GET /health during the load: {res['health']['probes']} probes, {res['health']['failures']} failures, "
            f"p50 {res['health']['p50_ms']:.1f} ms, max {res['health']['max_ms']:.1f} ms.", "",
            f"Server RSS: {m['start']:.0f} MB at the start, peak {m['peak']:.0f} MB, {m['end']:.0f} MB at the end; "
            f"slope over the last two thirds {m['slope_mb_per_min_last_two_thirds']:+.1f} MB/min "
            f"({len(m['samples'])} samples, every 0.5 s){short}.", ""]
    if res["errors_sample"]:
        out += ["Errors (first ones):", ""] + [f"* {e}" for e in res["errors_sample"]] + [""]
    return "\n".join(out)


# -- main ----------------------------------------------------------------------------------------------------
def tiny_store() -> Path:
    """The tiny test models (tests/conftest.py's recipe), trained and exported into a temporary store."""
    from tests.conftest import _tiny_config
    from training.export import export_checkpoint
    from training.train import Trainer

    base = Path(tempfile.mkdtemp(prefix="dpserve-load-"))
    store = base / "store"
    for kind, name in (("loc_frame", "water-locframe-tiny"), ("se_e2_a", "water-se-tiny")):
        Trainer(_tiny_config(kind, base / name), log=lambda *a: None).run()
        export_checkpoint(base / name / "checkpoint.pt", name, "1", store=store, precision="float64",
                          check_frames=2, log=lambda *a: None)
    return store


def water_models(store: Path) -> list[str]:
    out = []
    for manifest in sorted(store.glob("*/*/manifest.json")):
        m = json.loads(manifest.read_text())
        if {"O", "H"} <= set(m.get("type_map", [])):
            out.append(f"{manifest.parent.parent.name}/{manifest.parent.name}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", type=Path, default=ROOT / "model_store")
    p.add_argument("--tiny", action="store_true", help="train and serve the tiny test models (needs torch)")
    p.add_argument("--quick", action="store_true", help="10 s instead of --duration")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (default %(default)s)")
    p.add_argument("--clients", type=int, default=48)
    p.add_argument("--big-clients", type=int, default=2, help="clients sending 1536-atom boxes")
    p.add_argument("--max-requests", type=int, default=1_000_000, help="stop after this many requests")
    p.add_argument("--max-queue-requests", type=int, default=None, help="DPSERVE_MAX_QUEUE_REQUESTS of the server")
    p.add_argument("--out", type=Path, default=HERE / "results" / "load.json")
    args = p.parse_args(argv)
    duration = 10.0 if args.quick else args.duration

    store = tiny_store() if args.tiny else args.store.resolve()
    models = water_models(store)
    if not models:
        raise SystemExit(f"no O/H model in {store}; train and export one, or pass --tiny")
    print(f"store {store}: models {models}; computing references in-process", flush=True)
    refs = references(store, models)
    requests = build_requests(models)
    natoms = {"molecule": 3, "box192": 192, "box1536": 1536}
    if args.max_queue_requests:
        os.environ["DPSERVE_MAX_QUEUE_REQUESTS"] = str(args.max_queue_requests)
    res = {"quick": args.quick, "clients": args.clients, "big_clients": args.big_clients, "models": models,
           "store": str(store), "max_queue_requests": args.max_queue_requests,
           "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "machine": {"cpus": os.cpu_count(), "loadavg": [round(x, 2) for x in os.getloadavg()],
                       "platform": platform.platform(), "python": platform.python_version()}}
    log = Path(tempfile.gettempdir()) / "dpserve-load-server.log"
    print(f"server log: {log}", flush=True)
    with Server(store, log) as server:
        port = server.port
        asyncio.run(warm_up(port, requests))
        sampler = MemorySampler(server.proc.pid)
        sampler.start()
        print(f"{args.clients} clients for {duration:g} s ...", flush=True)
        try:
            tally, health, health_failures, elapsed = asyncio.run(
                run_load(port, requests, refs, models, args.clients, args.big_clients, duration,
                         args.max_requests, natoms))
        finally:
            sampler.stopped.set()
            sampler.join()
    summarise(tally, health, health_failures, elapsed, sampler.samples, res)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    args.out.with_suffix(".md").write_text(md + "\n")
    print(md)
    bad = res["requests"]["other"] + res["requests"]["wrong"] + res["health"]["failures"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
