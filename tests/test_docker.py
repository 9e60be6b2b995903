"""Dockerfile and docker-compose.yml, checked for what can be checked without a Docker engine: they parse,
and name the right module, port, health path, model store path and GPU reservation."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for ln in joined.splitlines():
        if ln.strip():
            word, _, rest = ln.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def instr(name: str) -> list[str]:
    return [args for word, args in dockerfile() if word == name]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_dockerfile_base_is_cuda13_cudnn9_runtime():
    (base,) = instr("FROM")
    assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-ubuntu\d\d\.\d\d", base), base


def test_dockerfile_cmd_runs_the_app_on_port_8000():
    cmd = json.loads(instr("CMD")[-1])
    assert cmd[:2] == ["uvicorn", "app.main:app"]
    assert cmd[cmd.index("--port") + 1] == "8000" and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert "8000" in instr("EXPOSE")
    module, attr = cmd[1].split(":")
    assert hasattr(importlib.import_module(module), attr)


def test_dockerfile_healthcheck_probes_health():
    (hc,) = instr("HEALTHCHECK")
    assert "http://127.0.0.1:8000/health" in hc and " CMD " in f" {hc} "


def test_dockerfile_installs_without_train_extra_and_runs_as_non_root():
    runs = " ".join(instr("RUN"))
    assert re.search(r"pip install \.(\s|$)", runs) and "[train" not in runs and "torch" not in runs
    users = instr("USER")
    assert users and users[-1] not in ("root", "0")
    envs = " ".join(instr("ENV"))
    assert "DPSERVE_MODEL_STORE=/models" in envs


def test_dockerfile_copies_exist_and_are_not_ignored():
    ignored = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")}
    for args in instr("COPY"):
        for src in args.split()[:-1]:
            assert src not in ignored, src
            if src != "model_store":  # the shipped models arrive separately from the code
                assert (ROOT / src).exists(), src


def test_compose_service_command_port_volume_and_health(compose):
    svc = compose["services"]["dpserve"]
    assert svc["command"][:2] == ["uvicorn", "app.main:app"]
    assert svc["command"][svc["command"].index("--port") + 1] == "8000"
    assert "8000:8000" in svc["ports"]
    assert "./model_store:/models:ro" in svc["volumes"]
    assert svc["environment"]["DPSERVE_MODEL_STORE"] == "/models"
    assert "/health" in " ".join(svc["healthcheck"]["test"]) and "8000" in " ".join(svc["healthcheck"]["test"])
    assert svc["build"] == "."


def test_compose_reserves_a_gpu(compose):
    (dev,) = compose["services"]["dpserve"]["deploy"]["resources"]["reservations"]["devices"]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]


def test_compose_documents_scaling_out():
    text = (ROOT / "docker-compose.yml").read_text()
    assert "docker compose up --scale dpserve=" in text and "load balancer" in text


def test_cli_serve_runs_the_same_app():
    assert '"app.main:app"' in (ROOT / "app" / "cli.py").read_text()


@pytest.mark.parametrize(("flags", "expected"), [([], False), (["--access-log"], True), (["--no-access-log"], False)])
def test_cli_serve_access_log_is_off_unless_asked(monkeypatch, flags, expected):
    """`dpserve serve` runs uvicorn like the Docker image (no per-request log line) unless --access-log."""
    import signal

    import uvicorn

    from app.cli import main

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    monkeypatch.setattr(signal, "signal", lambda *a: None)
    assert main(["serve", "--port", "8123", *flags]) == 0
    assert seen["app"] == "app.main:app" and seen["port"] == 8123
    assert seen["access_log"] is expected
