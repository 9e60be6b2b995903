"""POST /predict is answered by the ASGI fast path (app.api.fastpath) ahead of FastAPI's router; the FastAPI
route stays for the OpenAPI schema. Both must give the same answers, errors and headers, byte for byte."""

from __future__ import annotations

import json

import httpx
import msgpack
import pytest
from fastapi.testclient import TestClient

from app.api.fastpath import PredictFastPath
from app.api.routes import predict as predict_route
from app.main import create_app

from .conftest import SE, WATER_MOLECULE, make_settings, water_box

KEY = "fast-path-s3cret"
MOLECULE = json.dumps({"model": SE, "frames": [WATER_MOLECULE]}).encode()
CASES = {
    "one molecule": (MOLECULE, {"X-API-Key": KEY}),
    "bearer key, stress and atomic energies": (json.dumps({"model": SE, "frames": [water_box()],
                                                            "properties": ["energy", "stress", "atomic_energies"]}).encode(),
                                                {"Authorization": f"Bearer {KEY}"}),
    "msgpack answer": (MOLECULE, {"X-API-Key": KEY, "Accept": "application/msgpack"}),
    "msgpack request": (msgpack.packb({"model": SE, "frames": [WATER_MOLECULE]}),
                        {"X-API-Key": KEY, "Content-Type": "application/msgpack"}),
    "no key": (MOLECULE, {}),
    "wrong key": (MOLECULE, {"X-API-Key": "nope"}),
    "basic auth is no key": (MOLECULE, {"Authorization": f"Basic {KEY}"}),
    "unknown model": (json.dumps({"model": "nope", "frames": [WATER_MOLECULE]}).encode(), {"X-API-Key": KEY}),
    "unknown element": (json.dumps({"model": SE, "frames": [{"species": ["Xx"], "positions": [[0, 0, 0]]}]}).encode(),
                        {"X-API-Key": KEY}),
    "malformed JSON": (b'{"frames": [', {"X-API-Key": KEY}),
    "unsupported content type": (MOLECULE, {"X-API-Key": KEY, "Content-Type": "text/plain"}),
    "body beyond max_body_bytes": (b" " * 5000 + MOLECULE, {"X-API-Key": KEY}),
}
HEADERS = ("content-type", "www-authenticate", "retry-after", "access-control-allow-origin")


def _app(tiny_store, fast: bool):
    app = create_app(make_settings(tiny_store, api_keys=[KEY], max_body_bytes=4096, cors_origins=["https://lab.example.org"]))
    if not fast:
        app.user_middleware = [m for m in app.user_middleware if m.cls is not PredictFastPath]
    return app


@pytest.fixture(scope="module")
def both(tiny_store):
    with TestClient(_app(tiny_store, True)) as fast, TestClient(_app(tiny_store, False)) as route:
        yield fast, route


@pytest.mark.parametrize("case", list(CASES))
def test_fast_path_answers_as_the_route(both, case, monkeypatch):
    body, headers = CASES[case]
    headers = {"Content-Type": "application/json", "Origin": "https://lab.example.org", **headers}
    calls = []
    original = predict_route.handle_predict

    async def counted(*args, **kw):
        calls.append(1)
        return await original(*args, **kw)

    monkeypatch.setattr(predict_route, "handle_predict", counted)  # the route's name only: the fast path holds its own
    fast, route = both
    a = fast.post("/predict", content=body, headers=headers)
    assert not calls  # the fast path answered, the route never ran
    b = route.post("/predict", content=body, headers=headers)
    assert a.status_code == b.status_code, (case, a.text, b.text)
    assert a.content == b.content, case
    for h in HEADERS:
        assert a.headers.get(h) == b.headers.get(h), (case, h)
    if b.status_code not in (401, 403):
        assert calls  # the route ran (key refusals happen in its dependency, before the handler)


def test_repeated_headers_read_as_the_route_reads_them(both):
    fast, route = both
    headers = [("content-type", "application/json"), ("content-type", "text/plain"), ("x-api-key", KEY),
               ("x-api-key", "nope"), ("accept", "application/msgpack"), ("accept", "application/json")]
    a = fast.post("/predict", content=MOLECULE, headers=httpx.Headers(headers))
    b = route.post("/predict", content=MOLECULE, headers=httpx.Headers(headers))
    assert a.status_code == b.status_code == 200 and a.content == b.content
    assert a.headers["content-type"] == b.headers["content-type"]


def test_both_count_in_the_metrics_as_predict(both):
    fast, _ = both
    fast.post("/predict", content=MOLECULE, headers={"X-API-Key": KEY, "Content-Type": "application/json"})
    fast.post("/predict", content=MOLECULE, headers={"Content-Type": "application/json"})
    text = fast.get("/metrics").text
    assert 'dpserve_requests_total{method="POST",route="/predict",status="200"}' in text
    assert 'dpserve_requests_total{method="POST",route="/predict",status="401"}' in text


def test_other_methods_and_paths_go_to_fastapi(both):
    fast, _ = both
    assert fast.get("/predict").status_code == 405  # FastAPI's answer, not the fast path's
    assert fast.post("/predict/", content=MOLECULE, follow_redirects=False).status_code == 307  # FastAPI's redirect
