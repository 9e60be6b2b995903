"""/health, /ready and /metrics; /health answers while a model call is running."""

from __future__ import annotations

import threading
import time

from .conftest import SE, WATER_MOLECULE, post, water_box


def test_health_and_ready(client):
    assert client.get("/health").json() == {"status": "ok"}
    r = client.get("/ready")
    assert r.status_code == 200 and r.json()["ready"] is True
    assert set(r.json()["models"]) == {"water-locframe-tiny/1", "water-se-tiny/1"}


def test_metrics_count_requests_batches_and_atoms(client):
    post(client, {"model": SE, "frames": [WATER_MOLECULE, water_box()]})
    post(client, {"model": "nope", "frames": [WATER_MOLECULE]})
    client.get("/no-such-page")
    text = client.get("/metrics").text
    assert 'dpserve_requests_total{method="POST",route="/predict",status="200"}' in text
    assert 'dpserve_requests_total{method="POST",route="/predict",status="404"}' in text
    assert 'dpserve_requests_total{method="GET",route="unmatched",status="404"}' in text
    assert 'dpserve_request_duration_seconds_bucket{le="0.001",route="/predict"}' in text
    assert 'dpserve_batch_frames_count{model="water-se-tiny/1"}' in text
    assert 'dpserve_batch_atoms_sum{model="water-se-tiny/1"}' in text
    assert 'dpserve_atoms_total{model="water-se-tiny/1"}' in text
    assert 'dpserve_atoms_per_second{model="water-se-tiny/1"}' in text
    assert 'dpserve_queue_depth{model="water-se-tiny/1"} 0.0' in text
    assert "dpserve_models_loaded 2.0" in text
    atoms = [line for line in text.splitlines() if line.startswith('dpserve_atoms_total{model="water-se-tiny/1"}')]
    assert float(atoms[0].split()[-1]) >= 195


def test_health_answers_while_a_model_call_runs(client, monkeypatch):
    model = client.app.state.registry.find(SE)
    started, original = threading.Event(), model.predict

    def slow_predict(frames, **kw):
        started.set()
        time.sleep(1.5)
        return original(frames, **kw)

    monkeypatch.setattr(model, "predict", slow_predict)
    status = {}
    worker = threading.Thread(target=lambda: status.setdefault("code", post(client, {"model": SE, "frames": [WATER_MOLECULE]}).status_code))
    worker.start()
    assert started.wait(10)
    t0 = time.perf_counter()
    assert client.get("/health").status_code == 200
    assert time.perf_counter() - t0 < 0.5
    worker.join(30)
    assert status["code"] == 200


def test_an_internal_failure_is_a_500_and_the_server_goes_on(client, monkeypatch):
    model = client.app.state.registry.find(SE)

    def broken(frames, **kw):
        raise FloatingPointError("simulated fault inside the model")

    monkeypatch.setattr(model, "predict", broken)
    r = post(client, {"model": SE, "frames": [WATER_MOLECULE]})
    assert r.status_code == 500
    assert "internal error while evaluating model water-se-tiny/1" in r.json()["detail"]
    monkeypatch.undo()
    assert post(client, {"model": SE, "frames": [WATER_MOLECULE]}).status_code == 200
