"""Server-wide pending bounds: beyond max_pending_requests or max_pending_body_bytes a /predict request is
shed with 503 + Retry-After *before its body is read* (counted in /metrics), a lone request is always
admitted, /health keeps answering, and every way a request ends gives its reservation back."""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient

from app.main import create_app

from .conftest import SE, WATER_MOLECULE, make_settings, message, post
from .test_overload import Gate, _in_thread

BODY = json.dumps({"model": SE, "frames": [WATER_MOLECULE]}).encode()  # 100 to 200 bytes


def _post_raw(client, body: bytes, chunked: bool = False):
    """POST ``body`` as JSON, with Content-Length or (``chunked``) streamed without one."""
    def stream():
        yield body

    content = stream() if chunked else body
    return client.post("/predict", content=content, headers={"content-type": "application/json"})


def _counters(client) -> tuple[int, int]:
    service = client.app.state.service
    return service.pending, service.pending_bytes


def _assert_shed(r, setting: str) -> None:
    assert r.status_code == 503, r.text
    assert int(r.headers["retry-after"]) >= 1
    assert "overloaded" in message(r) and setting in message(r) and f"DPSERVE_{setting.upper()}" in message(r)


def test_streamed_body_has_no_content_length(tiny_store):
    """The ``chunked`` posts below really arrive without Content-Length (counted as they stream in)."""
    with TestClient(create_app(make_settings(tiny_store))) as client:
        def stream():
            yield BODY

        request = client.build_request("POST", "/predict", content=stream())
        assert "content-length" not in request.headers


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_shed_beyond_max_pending_body_bytes_and_counters_restored(tiny_store, chunked):
    assert len(BODY) > 100
    with TestClient(create_app(make_settings(tiny_store, max_pending_body_bytes=1000))) as client:
        service = client.app.state.service
        service.pending, service.pending_bytes = 1, 950  # another request holds 950 bytes
        t0 = time.perf_counter()
        r = _post_raw(client, BODY, chunked)
        assert time.perf_counter() - t0 < 1.0
        _assert_shed(r, "max_pending_body_bytes")
        assert _counters(client) == (1, 950)  # the shed request gave back what it held
        assert client.get("/health").status_code == 200
        metrics = client.get("/metrics").text
        assert 'dpserve_shed_total{model="none",reason="pending_bytes"} 1.0' in metrics

        service.pending, service.pending_bytes = 1, 1000 - len(BODY)  # exactly room for it
        assert _post_raw(client, BODY, chunked).status_code == 200
        assert _counters(client) == (1, 1000 - len(BODY))


def test_shed_beyond_max_pending_requests_while_health_answers(tiny_store):
    with TestClient(create_app(make_settings(tiny_store, max_pending_requests=3))) as client:
        service = client.app.state.service
        service.pending, service.pending_bytes = 3, 10
        r = _post_raw(client, BODY)
        _assert_shed(r, "max_pending_requests")
        assert "3 requests pending" in message(r)
        assert _counters(client) == (3, 10)
        for path in ("/health", "/ready"):
            assert client.get(path).status_code == 200
        assert 'reason="pending_requests"} 1.0' in client.get("/metrics").text

        service.pending = 2  # room for one more
        assert _post_raw(client, BODY).status_code == 200
        assert _counters(client) == (2, 10)


@pytest.mark.parametrize("limit", ["requests", "bytes"])
def test_request_in_flight_holds_its_reservation(tiny_store, monkeypatch, limit):
    """A real request, stuck in its model call, holds its slot and body bytes until answered."""
    setting = "max_pending_requests" if limit == "requests" else "max_pending_body_bytes"
    kw = {setting: 1 if limit == "requests" else len(BODY) + 10}
    with TestClient(create_app(make_settings(tiny_store, batch_wait_ms=0, **kw))) as client:
        model = client.app.state.service.registry.find(SE)
        gate = Gate(model)
        monkeypatch.setattr(model, "predict", gate)
        answers: list = []
        first = _in_thread(client, {"model": SE, "frames": [WATER_MOLECULE]}, answers)
        try:
            assert gate.entered.wait(10)
            assert _counters(client)[0] == 1 and _counters(client)[1] > 0
            _assert_shed(_post_raw(client, BODY), setting)
            for path in ("/health", "/ready", "/metrics"):  # operations endpoints keep answering
                t0 = time.perf_counter()
                assert client.get(path).status_code == 200
                assert time.perf_counter() - t0 < 0.5
        finally:
            gate.open.set()
            first.join(30)
        assert [a.status_code for a in answers] == [200]
        assert _counters(client) == (0, 0)
        assert _post_raw(client, BODY).status_code == 200


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_lone_request_beyond_max_pending_body_bytes_is_served(tiny_store, chunked):
    settings = make_settings(tiny_store, max_pending_body_bytes=1, max_pending_requests=1)
    with TestClient(create_app(settings)) as client:
        r = _post_raw(client, BODY, chunked)
        assert r.status_code == 200, r.text
        assert len(r.json()["results"][0]["forces"]) == 3
        assert _counters(client) == (0, 0)


@pytest.mark.parametrize(("body", "status"), [
    (b'{"frames": [', 400),  # malformed JSON
    (json.dumps({"model": SE, "frames": []}).encode(), 422),
    (json.dumps({"model": "no-such-model", "frames": [WATER_MOLECULE]}).encode(), 404),
    (b"x" * 5000, 413),  # beyond max_body_bytes
])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_refused_requests_give_their_reservation_back(tiny_store, body, status, chunked):
    settings = make_settings(tiny_store, max_body_bytes=4096, max_pending_requests=1,
                             max_pending_body_bytes=64)
    with TestClient(create_app(settings)) as client:
        r = _post_raw(client, body, chunked)
        assert r.status_code == status, r.text
        assert _counters(client) == (0, 0)
        assert _post_raw(client, BODY).status_code == 200  # nothing leaked: the next request is admitted


def test_timed_out_request_gives_its_reservation_back(tiny_store, monkeypatch):
    with TestClient(create_app(make_settings(tiny_store, request_timeout_s=0.3, batch_wait_ms=0))) as client:
        model = client.app.state.service.registry.find(SE)
        monkeypatch.setattr(model, "predict", Gate(model, delay=0.8))
        assert post(client, {"model": SE, "frames": [WATER_MOLECULE]}).status_code == 504
        assert _counters(client) == (0, 0)


def test_client_disconnect_mid_body_gives_its_reservation_back(tiny_store):
    """The client goes away after part of its body: the request ends without an answer and releases."""
    with TestClient(create_app(make_settings(tiny_store))) as client:
        seen: list = []
        messages = iter([{"type": "http.request", "body": b'{"frames": [', "more_body": True},
                         {"type": "http.disconnect"}])

        async def receive():
            seen.append(_counters(client))
            return next(messages)

        sent: list = []

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/predict", "raw_path": b"/predict", "query_string": b"",
                 "root_path": "", "client": ("testclient", 50000), "server": ("testserver", 80),
                 "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"),
                             (b"content-length", b"1000")]}
        client.portal.call(client.app, scope, receive, send)
        assert seen == [(1, 1000), (1, 1000)]  # held the declared length while reading
        assert _counters(client) == (0, 0)
        assert sent == []  # nobody to answer
