"""Access control: the admin bearer token, optional API keys for /predict, CORS, and no secrets in logs."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient

from app.main import create_app

from .conftest import SE, WATER_MOLECULE, make_settings, message

ADMIN, KEYS = "admin-s3cret-token", ["key-one-s3cret", "key-two-s3cret"]
BODY = {"model": SE, "frames": [WATER_MOLECULE]}


@pytest.fixture(scope="module")
def secured(tiny_store):
    settings = make_settings(tiny_store, admin_token=ADMIN, api_keys=KEYS, cors_origins=["https://lab.example.org"])
    with TestClient(create_app(settings)) as c:
        yield c


def test_admin_endpoint_needs_the_bearer_token(secured):
    r = secured.post("/admin/reload")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    r = secured.post("/admin/reload", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 403 and message(r) == "invalid admin token"
    r = secured.post("/admin/reload", headers={"Authorization": f"Basic {ADMIN}"})  # not a bearer token
    assert r.status_code == 401
    r = secured.post("/admin/reload", headers={"X-API-Key": KEYS[0], "Authorization": f"Bearer {KEYS[0]}"})
    assert r.status_code == 403  # an API key is not the admin token
    r = secured.post("/admin/reload", headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200 and f"{SE}/1" in r.json()["models"]


def test_admin_endpoints_are_disabled_without_a_token(client):
    r = client.post("/admin/reload", headers={"Authorization": "Bearer anything"})
    assert r.status_code == 403 and "disabled" in message(r) and "DPSERVE_ADMIN_TOKEN" in message(r)


def test_api_keys_guard_predict(secured):
    r = secured.post("/predict", json=BODY)
    assert r.status_code == 401 and "API key" in message(r) and r.headers["www-authenticate"] == "Bearer"
    r = secured.post("/predict", json=BODY, headers={"X-API-Key": "nope"})
    assert r.status_code == 403 and message(r) == "invalid API key"
    r = secured.post("/predict", json=BODY, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 403
    assert secured.post("/predict", json=BODY, headers={"X-API-Key": KEYS[0]}).status_code == 200
    assert secured.post("/predict", json=BODY, headers={"Authorization": f"Bearer {KEYS[1]}"}).status_code == 200


def test_api_key_is_checked_before_the_body_is_read(secured):
    r = secured.post("/predict", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 401


def test_operations_endpoints_stay_open(secured):
    for path in ("/health", "/ready", "/metrics", "/models", "/openapi.json"):
        assert secured.get(path).status_code == 200, path


def test_predict_is_open_when_no_api_keys_are_set(client):
    assert client.post("/predict", json=BODY).status_code == 200


def test_cors_allows_only_the_configured_origins(secured, client):
    pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type,x-api-key"}
    r = secured.options("/predict", headers={"Origin": "https://lab.example.org", **pre})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://lab.example.org"
    r = secured.options("/predict", headers={"Origin": "https://evil.example.com", **pre})
    assert "access-control-allow-origin" not in r.headers
    r = secured.get("/health", headers={"Origin": "https://lab.example.org"})
    assert r.headers["access-control-allow-origin"] == "https://lab.example.org"
    r = client.get("/health", headers={"Origin": "https://lab.example.org"})  # default: no CORS at all
    assert "access-control-allow-origin" not in r.headers


def test_secrets_never_reach_logs_or_responses(tiny_store, caplog):
    settings = make_settings(tiny_store, admin_token=ADMIN, api_keys=KEYS)
    with caplog.at_level(logging.DEBUG), TestClient(create_app(settings)) as c:
        c.post("/admin/reload", headers={"Authorization": "Bearer wrong-guess"})
        c.post("/admin/reload", headers={"Authorization": f"Bearer {ADMIN}"})
        c.post("/predict", json=BODY, headers={"X-API-Key": "wrong-key-guess"})
        c.post("/predict", json=BODY, headers={"X-API-Key": KEYS[0]})
        seen = caplog.text + c.get("/metrics").text + c.get("/models").text + repr(settings) + str(settings)
    assert "wrong token refused" in caplog.text and "invalid API key refused" in caplog.text
    for secret in (ADMIN, *KEYS, "wrong-guess", "wrong-key-guess"):
        assert secret not in seen
