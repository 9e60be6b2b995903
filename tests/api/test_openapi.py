"""Swagger: the /predict examples succeed when pressed, and every field says what it is."""

from __future__ import annotations

import pytest

from .conftest import LOCFRAME, SE


def _examples(client) -> dict:
    op = client.app.openapi()["paths"]["/predict"]["post"]
    return op["requestBody"]["content"]["application/json"]["examples"]


def test_predict_has_the_two_examples(client):
    assert set(_examples(client)) == {"water_molecule", "water_box"}


@pytest.mark.parametrize("model", [None, SE, LOCFRAME])
def test_openapi_examples_post_successfully(client, model):
    for name, example in _examples(client).items():
        body = dict(example["value"])
        if model:
            body["model"] = model
        r = client.post("/predict", json=body)
        assert r.status_code == 200, (name, r.text)
        results = r.json()["results"]
        assert len(results) == len(body["frames"])
        n = len(body["frames"][0]["species"])
        assert len(results[0]["forces"]) == n
        if name == "water_box":
            assert n == 192 and len(results[0]["stress"]) == 6


def test_every_request_and_response_field_is_documented(client):
    schemas = client.app.openapi()["components"]["schemas"]
    for model in ("PredictRequest", "FrameIn", "FrameResult"):
        for field, spec in schemas[model]["properties"].items():
            assert spec.get("description"), f"{model}.{field} has no description"
    text = str(schemas["FrameResult"]) + str(schemas["FrameIn"])
    for unit in ("eV/Angstrom", "eV/Angstrom^3", "Angstrom", "(N, 3)", "(3, 3)"):
        assert unit in text


def test_docs_page_is_served(client):
    assert client.get("/docs").status_code == 200
    assert client.get("/openapi.json").status_code == 200


def test_every_setting_is_documented_with_its_environment_variable():
    from pathlib import Path

    from app.core.config import Settings

    doc = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()
    for name in Settings.model_fields:
        assert f"`DPSERVE_{name.upper()}` | `{name}`" in doc, name
