"""The `dpserve` command: serve, train, export, test, ipi (training commands import torch lazily)."""

from __future__ import annotations

import argparse
import sys


def _exit_cleanly(signum, frame):
    raise SystemExit(0)


def _serve(args) -> int:
    import os
    import signal

    import uvicorn

    if args.store:
        os.environ["DPSERVE_MODEL_STORE"] = args.store
    # glibc reads MALLOC_ARENA_MAX only at process start: set it and start again, so every thread (also those
    # onnxruntime and numba create at import) shares few arenas. 300 s of mixed load: RSS flat (-12 MB/min)
    # this way, still creeping (+89 MB/min) with only the in-app mallopt of app.main.limit_malloc_arenas.
    # Only when started from the command line (`dpserve serve ...`, `python -m app.cli serve ...`): a program
    # that calls main(["serve", ...]) itself keeps its process (and gets app.main's in-app mallopt only).
    if "MALLOC_ARENA_MAX" not in os.environ and sys.platform.startswith("linux") and sys.argv[1:2] == ["serve"]:
        from app.core.config import get_settings

        n = get_settings().malloc_arena_max
        if n > 0:
            os.environ["MALLOC_ARENA_MAX"] = str(n)
            as_module = sys.argv[0].replace("\\", "/").endswith("app/cli.py")
            os.execv(sys.executable, [sys.executable, *(["-m", "app.cli"] if as_module else sys.argv[:1]), *sys.argv[1:]])
    # On SIGTERM or SIGINT uvicorn shuts down gracefully (stops accepting connections, lets in-flight requests
    # finish, runs the lifespan shutdown that drains the batchers), then raises the signal again with the
    # handler that was in place before it started. This one turns that into exit status 0; SIGHUP reloads
    # the model store (installed by the app). Plain `uvicorn app.main:app` exits by the signal instead (143).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_cleanly)
    uvicorn.run("app.main:app", host=args.host, port=args.port, workers=args.workers, log_level=args.log_level,
                access_log=args.access_log)
    return 0


def _train(args) -> int:
    from training.config import ConfigError, load_config
    from training.train import Trainer

    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out_dir:
        cfg.training.out_dir = args.out_dir
    if args.threads:
        cfg.training.threads = args.threads
    if args.no_progress:
        cfg.training.progress = False
    row = Trainer(cfg, resume=args.resume).run()
    print(
        f"done: step {row.get('step')}, validation RMSE energy {row.get('rmse_e_val', float('nan')) * 1000:.3f} meV/atom, "
        f"force {row.get('rmse_f_val', float('nan')):.4f} eV/A; outputs in {cfg.training.out_dir}"
    )
    return 0


def _export(args) -> int:
    from training.export import export_checkpoint

    export_checkpoint(args.checkpoint, args.name, args.version, store=args.store, precision=args.precision,
                      overwrite=args.overwrite, repulsion=args.repulsion)
    return 0


def _test(args) -> int:
    from training.evaluate import evaluate_cli

    return evaluate_cli(args)


def _ipi(args) -> int:
    import logging

    from app.ipi import read_species, run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    address = port = None
    if args.address:
        address, _, port = args.address.rpartition(":")
        if not address or not port.isdigit():
            print(f"error: --address must be HOST:PORT, got {args.address!r}", file=sys.stderr)
            return 2
    species = read_species(args.init_file) if args.init_file else None
    n = run(args.server, species, args.model, address=address, port=port, unix=args.unix,
            sockets_prefix=args.sockets_prefix, isolated=args.isolated, encoding=args.encoding, wait=args.wait)
    print(f"i-PI finished: {n} structures evaluated by {args.server}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dpserve", description="Deep Potential models as a web service")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="start the HTTP service on the models in the store")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--workers", type=int, default=1)
    s.add_argument("--store", default=None, help="model store path (default: settings / DPSERVE_MODEL_STORE)")
    s.add_argument("--log-level", default="info")
    # off by default, as in the Docker image: one log line per request costs throughput when MD codes and
    # many small clients call every few milliseconds (the request metrics are on /metrics either way)
    s.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=False,
                   help="log one line per request (default: off; counts and latencies are on /metrics)")
    s.set_defaults(func=_serve)

    t = sub.add_parser("train", help="train a model from a TOML config (needs the 'train' extra)")
    t.add_argument("config")
    t.add_argument("--resume", default=None, help="checkpoint to resume from")
    t.add_argument("--out-dir", default=None)
    t.add_argument("--threads", type=int, default=0)
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=_train)

    e = sub.add_parser("export", help="export a checkpoint to ONNX in the model store")
    e.add_argument("checkpoint")
    e.add_argument("--name", required=True)
    e.add_argument("--version", required=True)
    e.add_argument("--store", default="model_store")
    e.add_argument("--precision", default="float32", choices=["float32", "float64"])
    e.add_argument("--overwrite", action="store_true")
    e.add_argument("--repulsion", default="zbl", choices=["zbl", "none"],
                   help="add ZBL repulsion below each element pair's closest distance in the training data "
                        "(zero on every training frame; keeps MD from collapsing where the model never learned)")
    e.set_defaults(func=_export)

    v = sub.add_parser("test", help="dp-test-style errors of a model on data systems")
    v.add_argument("-m", "--model", required=True, help="model directory, or NAME[/VERSION] in the store")
    v.add_argument("-s", "--system", required=True, nargs="+", help="DeePMD system dirs (or roots) / extxyz files")
    v.add_argument("-n", "--numb-test", type=int, default=0, help="frames per system (0: all)")
    v.add_argument("--store", default="model_store")
    v.add_argument("--frames", choices=["all", "val"], default="all",
                   help="'val': only the frames the model held out during training (from its manifest)")
    v.set_defaults(func=_test)

    i = sub.add_parser("ipi", help="drive an i-PI simulation with forces from a running dpserve service",
                       description="Connects to i-PI's socket (i-PI is the server) and answers every "
                       "structure with one POST /predict. See docs/md.md.")
    where = i.add_mutually_exclusive_group(required=True)
    where.add_argument("--address", help="i-PI's inet socket, HOST:PORT (as in <ffsocket mode='inet'>)")
    where.add_argument("--unix", help="i-PI's unix socket NAME (the path is SOCKETS_PREFIX + NAME; "
                       "a NAME with a '/' is a whole path)")
    i.add_argument("--sockets-prefix", default="/tmp/ipi_", help="i-PI's <simulation sockets_prefix> "
                   "(default: %(default)s)")
    i.add_argument("--server", default="http://127.0.0.1:8000", help="dpserve URL (default: %(default)s)")
    i.add_argument("--model", default=None, help="model NAME or NAME/VERSION (default: the server's)")
    i.add_argument("--init-file", default=None, help="structure file ASE reads (e.g. i-PI's init xyz), "
                   "for the element symbols in i-PI's atom order; else 'species' in <parameters>")
    i.add_argument("--isolated", action="store_true", help="molecule or cluster: send no cell")
    i.add_argument("--encoding", default="msgpack", choices=["msgpack", "json"])
    i.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the service and for i-PI")
    i.set_defaults(func=_ipi)

    args = p.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
