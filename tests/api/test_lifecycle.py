"""The service as operators run it (`dpserve serve`, a uvicorn subprocess on 127.0.0.1): SIGHUP reloads the
store; SIGTERM lets in-flight requests finish, refuses new connections and exits 0 within a bound. The
subprocess slows every model call down (a monkeypatch in the child) so that a request is in flight."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from .conftest import SE, WATER_MOLECULE
from .test_reload import add_version

ROOT = Path(__file__).resolve().parents[2]
DELAY = 1.5  # seconds added to every model call in the child
CHILD = f"""
import sys, time
from app.inference.model import DeepPotModel
_predict = DeepPotModel.predict
def slow(self, frames, **kw):
    time.sleep({DELAY})
    return _predict(self, frames, **kw)
DeepPotModel.predict = slow
from app.cli import main
sys.exit(main(["serve", "--host", "127.0.0.1", "--port", sys.argv[1], "--log-level", "info"]))
"""
BODY = {"model": SE, "frames": [WATER_MOLECULE]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_store, tmp_path_factory):
    base = tmp_path_factory.mktemp("lifecycle")
    store = base / "store"
    shutil.copytree(tiny_store / SE, store / SE)
    port = _free_port()
    env = {**os.environ, "DPSERVE_MODEL_STORE": str(store), "DPSERVE_DEVICE": "cpu", "DPSERVE_INTRA_OP_THREADS": "1"}
    log = base / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(port)], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(url + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server not ready in 60 s:\n" + log.read_text()[-3000:]
            time.sleep(0.1)
        yield proc, url, store, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def served(url: str) -> list[str]:
    return [f"{m['name']}/{m['version']}" for m in httpx.get(url + "/models", timeout=5).json()["models"]]


def test_sighup_reloads_the_store(server):
    proc, url, store, log = server
    add_version(store, SE, "1", "2")
    proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while f"{SE}/2" not in served(url):
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)
    r = httpx.post(url + "/predict", json=BODY, timeout=30)
    assert r.status_code == 200 and r.json()["model"]["version"] == "2"
    assert "SIGHUP: reloading the model store" in log.read_text()
    assert proc.poll() is None


def test_sigterm_finishes_in_flight_requests_refuses_new_ones_and_exits_0(server):
    proc, url, _, log = server
    answers = []
    t = threading.Thread(target=lambda: answers.append(httpx.post(url + "/predict", json=BODY, timeout=30)))
    t.start()
    time.sleep(0.5)  # the request is inside its (1.5 s) model call now
    t_term = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(httpx.TransportError):  # the listening socket is closed: new requests are refused
        httpx.post(url + "/predict", json=BODY, timeout=5)
    t.join(30)
    assert answers and answers[0].status_code == 200, answers
    assert proc.wait(timeout=20) == 0, log.read_text()[-3000:]
    assert time.monotonic() - t_term < 20
    text = log.read_text()
    assert "Waiting for connections to close" in text or "Finished server process" in text
