"""The Python client against the real app (in-process through TestClient, and under uvicorn), and its
retry and error behaviour against scripted transports."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import httpx
import numpy as np
import pytest

from app.client import AsyncClient, Client, DPServeError
from tests.client.conftest import LOCFRAME, ROOT, SE, water_box, water_molecule


def _raw_predict(app_client, atoms, model, properties):
    body = {"model": model, "properties": properties,
            "frames": [{"species": atoms.get_chemical_symbols(), "positions": atoms.positions.tolist(),
                        "cell": atoms.cell.array.tolist(), "pbc": [True] * 3}]}
    r = app_client.post("/predict", json=body)
    assert r.status_code == 200, r.text
    return r.json()["results"][0]


@pytest.mark.parametrize("model", [SE, LOCFRAME])
def test_predict_returns_what_the_route_returns(app_client, model):
    atoms = water_box()
    props = ["energy", "forces", "virial", "stress", "atomic_energies"]
    raw = _raw_predict(app_client, atoms, model, props)
    r = Client(http_client=app_client).predict(atoms, properties=props, model=model)
    assert isinstance(r["energy"], float) and r["energy"] == raw["energy"]
    assert r["forces"].shape == (192, 3) and r["forces"].dtype == np.float64
    np.testing.assert_array_equal(r["forces"], raw["forces"])
    assert r["virial"].shape == (3, 3) and r["stress"].shape == (6,) and r["atomic_energies"].shape == (192,)
    np.testing.assert_array_equal(r["virial"], raw["virial"])
    np.testing.assert_array_equal(r["stress"], raw["stress"])
    np.testing.assert_array_equal(r["atomic_energies"], raw["atomic_energies"])


@pytest.mark.parametrize("model", [SE, LOCFRAME])
def test_json_and_msgpack_give_identical_numbers(app_client, model):
    atoms = water_box()
    props = ["energy", "forces", "virial", "stress", "atomic_energies"]
    rj = Client(http_client=app_client, encoding="json").predict(atoms, properties=props, model=model)
    rm = Client(http_client=app_client, encoding="msgpack").predict(atoms, properties=props, model=model)
    assert rj.keys() == rm.keys()
    for k in props:
        np.testing.assert_array_equal(rj[k], rm[k], err_msg=k)


def test_frames_as_atoms_dicts_keywords_and_lists(app_client):
    c = Client(http_client=app_client, encoding="msgpack", model=SE)
    box, mol = water_box(), water_molecule()
    one = c.predict(box)
    assert isinstance(one, dict) and set(one) >= {"energy", "forces", "virial"}  # the server's default
    as_dict = c.predict({"species": box.get_chemical_symbols(), "positions": box.positions, "cell": box.cell[:]})
    as_kw = c.predict(species=box.get_chemical_symbols(), positions=box.positions, cell=box.cell[:],
                      pbc=[True, True, True])
    both = c.predict([mol, box])
    assert isinstance(both, list) and len(both) == 2
    assert both[0]["forces"].shape == (3, 3) and both[1]["forces"].shape == (192, 3)
    for r in (as_dict, as_kw, both[1]):
        assert r["energy"] == pytest.approx(one["energy"], rel=1e-12)
        np.testing.assert_allclose(r["forces"], one["forces"], rtol=0, atol=1e-10)
    # an isolated molecule (no cell) equals the same molecule alone
    assert c.predict(mol)["energy"] == pytest.approx(both[0]["energy"], rel=1e-12)
    assert c.last_model == {"name": SE, "version": "1"}


def test_atomic_energies_add_up_and_model_is_reported(app_client):
    c = Client(http_client=app_client)
    r = c.predict(water_box(), properties=["energy", "atomic_energies"], model=LOCFRAME)
    assert set(r) >= {"energy", "atomic_energies"} and "forces" not in r
    assert r["atomic_energies"].sum() == pytest.approx(r["energy"], rel=1e-10)
    assert c.last_model["name"] == LOCFRAME


def test_bad_arguments_fail_before_any_request():
    c = Client("http://127.0.0.1:9", retries=0)  # nothing listens there: a request would fail differently
    with pytest.raises(ValueError, match="allowed"):
        c.predict(water_molecule(), properties=["energy", "charges"])
    with pytest.raises(ValueError, match=r"shape \(N, 3\)"):
        c.predict(species=["O", "H"], positions=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="2 species for 3 positions"):
        c.predict(species=["O", "H"], positions=np.zeros((3, 3)))
    with pytest.raises(ValueError, match="encoding"):
        Client(encoding="xml")


def test_4xx_raises_dpserve_error_with_the_servers_message(app_client):
    c = Client(http_client=app_client, encoding="msgpack")
    bad = water_molecule()
    bad.symbols[1] = "Xe"
    with pytest.raises(DPServeError) as e:
        c.predict(bad)
    assert e.value.status_code == 422
    assert "frames[0].species[1]" in e.value.message and "Xe" in e.value.message
    assert isinstance(e.value.detail, list) and "HTTP 422" in str(e.value)
    with pytest.raises(DPServeError) as e:
        c.predict(water_molecule(), model="no-such-model")
    assert e.value.status_code == 404 and "no-such-model" in e.value.message


def test_models_health_ready(app_client):
    c = Client(http_client=app_client)
    names = {m["name"] for m in c.models()}
    assert names == {SE, LOCFRAME}
    assert c.model_info(SE)["name"] == SE
    assert c.health() == {"status": "ok"}
    assert c.ready() is True


# -- retries, against a scripted transport -------------------------------------------------------------


def _scripted(responses):
    """A Client whose transport answers from ``responses`` (httpx.Response or an exception to raise), and
    records each request and each wait instead of sleeping."""
    calls, sleeps = [], []
    script = iter(responses)

    def handler(request: httpx.Request):
        calls.append(request)
        item = next(script)
        if isinstance(item, Exception):
            raise item
        return item

    c = Client("http://dpserve.test", http_client=httpx.Client(transport=httpx.MockTransport(handler)),
               retries=3, backoff=0.1, backoff_max=5.0)
    c._sleep = sleeps.append
    return c, calls, sleeps


OK_BODY = {"model": {"name": "m", "version": "1"},
           "results": [{"energy": -1.5, "forces": [[0.0, 0.0, 0.0]] * 3, "virial": [[0.0] * 3] * 3}]}


def test_retries_503_honouring_retry_after():
    busy = httpx.Response(503, headers={"Retry-After": "2"}, json={"detail": "overloaded, retry"})
    c, calls, sleeps = _scripted([busy, busy, httpx.Response(200, json=OK_BODY)])
    r = c.predict(water_molecule())
    assert r["energy"] == -1.5 and len(calls) == 3
    assert sleeps == [2.0, 2.0]
    assert all(req.content == calls[0].content for req in calls)  # the same body each time


def test_retries_connection_errors_with_exponential_backoff():
    down = httpx.ConnectError("connection refused")
    c, calls, sleeps = _scripted([down, down, httpx.Response(503), httpx.Response(200, json=OK_BODY)])
    assert c.predict(water_molecule())["energy"] == -1.5
    assert sleeps == [0.1, 0.2, 0.4]  # backoff * 2**attempt, no Retry-After given


def test_retry_after_is_capped_by_backoff_max():
    c, _, sleeps = _scripted([httpx.Response(503, headers={"Retry-After": "3600"}), httpx.Response(200, json=OK_BODY)])
    c.predict(water_molecule())
    assert sleeps == [5.0]


def test_gives_up_after_the_bounded_number_of_attempts():
    c, calls, sleeps = _scripted([httpx.Response(503, json={"detail": "overloaded"})] * 4)
    with pytest.raises(DPServeError) as e:
        c.predict(water_molecule())
    assert e.value.status_code == 503 and e.value.message == "overloaded"
    assert len(calls) == 4 and len(sleeps) == 3  # retries=3: four attempts
    c, calls, _ = _scripted([httpx.ConnectError("refused")] * 4)
    with pytest.raises(DPServeError, match="cannot reach") as e:
        c.predict(water_molecule())
    assert e.value.status_code is None and len(calls) == 4


def test_4xx_is_not_retried():
    c, calls, sleeps = _scripted([httpx.Response(422, json={"detail": [
        {"loc": ["body", "frames", 0, "positions"], "msg": "field required", "type": "missing"}]})])
    with pytest.raises(DPServeError) as e:
        c.predict(water_molecule())
    assert len(calls) == 1 and sleeps == []
    assert e.value.message == "frames[0].positions: field required"  # FastAPI's own errors get their path


def test_async_client_retries_then_answers():
    answers = iter([httpx.Response(503, headers={"Retry-After": "0"}), httpx.Response(200, json=OK_BODY)])

    async def main():
        http = httpx.AsyncClient(transport=httpx.MockTransport(lambda request: next(answers)))
        async with AsyncClient("http://dpserve.test", http_client=http, backoff=0.0) as c:
            return await c.predict([water_molecule()])

    (r,) = asyncio.run(main())
    assert r["energy"] == -1.5 and r["forces"].shape == (3, 3)


# -- over a real socket ---------------------------------------------------------------------------------


def test_async_client_against_the_live_server(live_server):
    box = water_box()

    async def main():
        async with AsyncClient(live_server, encoding="msgpack", model=SE) as c:
            many = await asyncio.gather(*(c.predict(box) for _ in range(4)))
            return many, await c.models()

    many, models = asyncio.run(main())
    with Client(live_server, model=SE) as c:
        ref = c.predict(box)
    for r in many:
        assert r["energy"] == pytest.approx(ref["energy"], rel=1e-12)
    assert {m["name"] for m in models} == {SE, LOCFRAME}


def test_one_keep_alive_connection_across_md_steps(live_server):
    box = water_box()
    with Client(live_server, encoding="msgpack") as c:
        for _ in range(5):
            box.positions += 0.001
            c.predict(box)
        pool = c._http._transport._pool  # httpcore's connection pool
        assert len(pool.connections) == 1


def test_client_imports_without_torch_fastapi_pydantic_or_onnxruntime():
    code = ("import sys\n"
            "for m in ('torch', 'fastapi', 'starlette', 'pydantic', 'onnxruntime', 'uvicorn'):\n"
            "    sys.modules[m] = None  # any import of these now fails\n"
            "from app.client import Client, AsyncClient, DPServeCalculator, DPServeError\n"
            "import app.ipi\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
