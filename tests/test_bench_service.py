"""The service benchmark's CPU accounting (benchmarks/bench_service.py), on this very process."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
bench = pytest.importorskip("bench_service")

linux = pytest.mark.skipif(not Path(f"/proc/{os.getpid()}/task").is_dir(), reason="needs Linux /proc")


def _burn(seconds: float) -> None:
    end = time.thread_time() + seconds  # this thread's own CPU time
    while time.thread_time() < end:
        pass


@linux
def test_cpu_per_request_splits_main_thread_from_the_others():
    """0.3 s burnt on the main thread and 0.3 s on another (alive until measured, as the server's worker
    threads are), over 10 'requests': about 30 ms each side."""
    done, release = threading.Event(), threading.Event()

    def other():
        _burn(0.3)
        done.set()
        release.wait(30)

    def run():
        t.start()
        _burn(0.3)
        done.wait(30)
        return {"requests": 10}

    t = threading.Thread(target=other)
    try:
        res = bench._cpu_per_request(os.getpid(), run)
    finally:
        release.set()
        t.join()
    c = res["cpu_us_per_request"]
    assert 20_000 < c["server_event_loop"] < 60_000  # clock ticks are 10 ms
    assert 20_000 < c["server_other_threads"] < 60_000
    assert c["client"] > 40_000  # the whole process, both threads


@linux
def test_cpu_per_request_counts_the_model_child_processes():
    """A child process burns 0.3 s of CPU over 10 'requests': about 30 ms each in its column, little elsewhere."""
    code = ("import sys, time\nsys.stdin.readline()\nend = time.process_time() + 0.3\n"
            "while time.process_time() < end: pass\nprint('done', flush=True)\nsys.stdin.readline()\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.pid in bench._children(os.getpid())

        def run():
            child.stdin.write("go\n")
            child.stdin.flush()
            assert child.stdout.readline().strip() == "done"
            return {"requests": 10}

        res = bench._cpu_per_request(os.getpid(), run)
    finally:
        child.stdin.close()
        child.wait(30)
    c = res["cpu_us_per_request"]
    assert 20_000 < c["model_processes"] < 60_000
    assert c["server_event_loop"] < 15_000


def test_thread_cpu_of_a_missing_process_is_empty():
    assert bench._thread_cpu(None) == {}
    assert bench._thread_cpu(2**22 + 12345) == {}
