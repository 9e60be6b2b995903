"""Model calls in a child process (app.inference.procworker through the batcher): the same numbers as the
server process computes, a lone request never pays the round trip, and a child that dies, cannot start or
serves a changed model costs no request anything."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import numpy as np
import pytest

from app.core.metrics import Metrics
from app.inference.batcher import Batcher
from app.inference.model import DeepPotModel, Frame
from app.inference.packing import predict_frames
from app.inference.procworker import ModelProcess, ModelProcessGone


@pytest.fixture(scope="module")
def model(tiny_store):
    return DeepPotModel.load(tiny_store / "water-se-tiny" / "1", device="cpu", intra_op_threads=1)


def molecule(shift: float) -> Frame:
    pos = np.array([[0.0, 0.0, 0.0], [0.7572, 0.5865, 0.0], [-0.7572, 0.5865, 0.0]]) + [shift, 0.1 * shift, 0.0]
    return Frame(types=np.array([0, 1, 1]), positions=pos)


def calls(metrics: Metrics, where: str, label: str) -> float:
    return metrics.model_calls.labels(label, where)._value.get()


async def _submit_all(batcher: Batcher, frames_per_job, ae=False):
    return await asyncio.gather(*(batcher.submit(f, atomic_energies=ae) for f in frames_per_job),
                                return_exceptions=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_child_computes_the_same_numbers_as_the_server_process(model):
    metrics = Metrics()
    jobs = [[molecule(0.05 * k)] for k in range(8)]

    async def main():
        b = Batcher(model, wait_s=0.01, metrics=metrics, process="on")
        b.start()
        try:
            assert await asyncio.get_running_loop().run_in_executor(None, b.process.wait_started, 120)
            return await _submit_all(b, jobs, ae=True), b.process.pid
        finally:
            await b.stop()

    out, pid = asyncio.run(main())
    label = f"{model.name}/{model.version}"
    assert calls(metrics, "process", label) >= 1 and calls(metrics, "thread", label) == 0
    for frames, res in zip(jobs, out, strict=True):
        (here,) = predict_frames(model, frames, atomic_energies=True)
        assert res[0]["energy"] == pytest.approx(here["energy"], rel=1e-12)
        np.testing.assert_allclose(res[0]["forces"], here["forces"], rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(res[0]["virial"], here["virial"], rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(res[0]["atomic_energies"], here["atomic_energies"], rtol=1e-12)
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:  # stop() ended the child
        time.sleep(0.05)
    assert not _alive(pid)


def test_auto_keeps_a_lone_request_in_the_server_process_and_starts_the_child_under_concurrency(model):
    metrics = Metrics()
    label = f"{model.name}/{model.version}"

    async def main():
        b = Batcher(model, wait_s=0.01, metrics=metrics, process="auto")
        b.start()
        try:
            for k in range(3):  # an MD code stepping: one request at a time
                await b.submit([molecule(0.1 * k)])
            assert b.process.state == "idle" and calls(metrics, "thread", label) == 3
            await _submit_all(b, [[molecule(0.1 * k)] for k in range(6)])  # concurrent: the child starts
            assert b.process.state in ("starting", "ready")
            assert await asyncio.get_running_loop().run_in_executor(None, b.process.wait_started, 120)
            out = await _submit_all(b, [[molecule(0.1 * k)] for k in range(6)])
            assert calls(metrics, "process", label) >= 1
            return out
        finally:
            await b.stop()

    out = asyncio.run(main())
    for k, res in enumerate(out):
        (here,) = predict_frames(model, [molecule(0.1 * k)])
        assert res[0]["energy"] == pytest.approx(here["energy"], rel=1e-12)


def test_a_killed_child_costs_no_request_and_is_restarted(model):
    metrics = Metrics()
    label = f"{model.name}/{model.version}"
    jobs = [[molecule(0.05 * k)] for k in range(6)]

    async def main():
        b = Batcher(model, wait_s=0.01, metrics=metrics, process="on")
        b.process.restart_after_s = 0.0
        b.start()
        loop = asyncio.get_running_loop()
        try:
            assert await loop.run_in_executor(None, b.process.wait_started, 120)
            first = b.process.pid
            os.kill(first, signal.SIGKILL)
            out = await _submit_all(b, jobs)  # the child is dead: the worker thread answers
            assert all(isinstance(r, list) for r in out), out
            assert calls(metrics, "thread", label) >= 1
            assert await loop.run_in_executor(None, b.process.wait_started, 120)  # started again
            assert b.process.pid != first
            again = await _submit_all(b, jobs)
            assert calls(metrics, "process", label) >= 1
            return out, again
        finally:
            await b.stop()

    out, again = asyncio.run(main())
    for frames, r1, r2 in zip(jobs, out, again, strict=True):
        (here,) = predict_frames(model, frames)
        assert r1[0]["energy"] == pytest.approx(here["energy"], rel=1e-12)
        assert r2[0]["energy"] == pytest.approx(here["energy"], rel=1e-12)


def test_a_model_error_in_the_child_stays_with_its_request(model):
    bad = Frame(types=np.array([0, 1, 7]), positions=molecule(0.0).positions)  # element index 7: predict fails

    async def main():
        b = Batcher(model, wait_s=0.01, process="on")
        b.start()
        try:
            assert await asyncio.get_running_loop().run_in_executor(None, b.process.wait_started, 120)
            return await _submit_all(b, [[molecule(0.5)], [bad], [molecule(0.7)]])
        finally:
            await b.stop()

    out = asyncio.run(main())
    assert isinstance(out[1], IndexError)
    (alone,) = predict_frames(model, [molecule(0.5)])
    assert out[0][0]["energy"] == pytest.approx(alone["energy"], rel=1e-12)
    assert isinstance(out[2], list)


def test_a_child_that_finds_another_model_on_disk_is_refused(model):
    proc = ModelProcess(model)
    proc.sha256 = "0" * 64  # as if the files had been replaced since the server loaded them
    assert not proc.wait_started(120)
    assert proc.state == "failed" and "changed on disk" in proc.reason

    async def call():
        await proc.call([molecule(0.0)], False, 8192)

    with pytest.raises(ModelProcessGone):
        asyncio.run(call())
    proc.ensure_started()  # within restart_after_s of the failure: not retried yet
    assert proc.state == "failed"
    proc.close_now()


def test_large_calls_stay_in_the_server_process(model):
    metrics = Metrics()
    label = f"{model.name}/{model.version}"

    async def main():
        b = Batcher(model, wait_s=0.01, metrics=metrics, process="on", process_max_atoms=5)
        b.start()
        try:
            assert await asyncio.get_running_loop().run_in_executor(None, b.process.wait_started, 120)
            await _submit_all(b, [[molecule(0.0)], [molecule(0.3)]])  # 6 atoms > 5
        finally:
            await b.stop()

    asyncio.run(main())
    assert calls(metrics, "process", label) == 0 and calls(metrics, "thread", label) == 1


def test_the_service_answers_through_the_child_process(tiny_store):
    """End to end: DPSERVE_MODEL_PROCESS=on, a molecule posted over HTTP gets the numbers the server process
    computes with model_process=off, and /metrics counts the call as 'process'."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from tests.api.conftest import SE, WATER_MOLECULE, make_settings

    body = {"model": SE, "frames": [WATER_MOLECULE], "properties": ["energy", "forces", "virial"]}
    answers = {}
    for mode in ("off", "on"):
        with TestClient(create_app(make_settings(tiny_store, model_process=mode))) as client:
            if mode == "on":
                service = client.app.state.service
                batcher = next(b for (name, _), b in service.batchers.items() if name == SE)
                assert batcher.process.wait_started(120)
            r = client.post("/predict", json=body)
            assert r.status_code == 200, r.text
            answers[mode] = r.json()["results"][0]
            metrics = client.get("/metrics").text
        if mode == "on":
            assert f'dpserve_model_calls_total{{model="{SE}/1",where="process"}} 1.0' in metrics
    assert answers["on"]["energy"] == pytest.approx(answers["off"]["energy"], rel=1e-12)
    np.testing.assert_allclose(answers["on"]["forces"], answers["off"]["forces"], rtol=1e-10, atol=1e-13)


def test_several_first_calls_to_a_fresh_child_all_get_answers(model):
    """Regression: calls in flight before the first connection was made opened one each and wedged the
    model. One molecule per call (max_batch_atoms=3), eight concurrent requests, no warm-up call."""
    metrics = Metrics()

    async def main():
        b = Batcher(model, wait_s=0.01, metrics=metrics, process="on", max_batch_atoms=3)
        b.start()
        try:
            assert await asyncio.get_running_loop().run_in_executor(None, b.process.wait_started, 120)
            jobs = asyncio.gather(*(b.submit([molecule(0.1 * k)]) for k in range(8)), return_exceptions=True)
            return await asyncio.wait_for(jobs, 60)
        finally:
            await b.stop(timeout=5)

    out = asyncio.run(main())
    assert all(isinstance(r, list) for r in out), out
    assert calls(metrics, "process", f"{model.name}/{model.version}") >= 3
    for k, r in enumerate(out):
        (here,) = predict_frames(model, [molecule(0.1 * k)])
        assert r[0]["energy"] == pytest.approx(here["energy"], rel=1e-12)


def test_an_answer_that_does_not_unpickle_fails_over_instead_of_hanging(model, monkeypatch):
    """Whatever breaks the read side, the calls in flight go back to the worker thread and the model keeps
    answering (here: every error reply fails to unpickle in the parent)."""
    import pickle

    from app.inference import procworker

    real = pickle.loads

    def loads(data):
        obj = real(data)
        if isinstance(obj, tuple) and obj and obj[0] == "exc":
            raise TypeError("simulated: this exception cannot be rebuilt")
        return obj

    monkeypatch.setattr(procworker.pickle, "loads", loads)
    bad = Frame(types=np.array([0, 1, 7]), positions=molecule(0.0).positions)

    async def main():
        b = Batcher(model, wait_s=0.01, process="on")
        b.start()
        try:
            assert await asyncio.get_running_loop().run_in_executor(None, b.process.wait_started, 120)
            (r1,) = await asyncio.wait_for(asyncio.gather(b.submit([bad]), return_exceptions=True), 30)
            r2 = await asyncio.wait_for(b.submit([molecule(0.3)]), 30)
            return r1, r2, b.process.state
        finally:
            await b.stop(timeout=5)

    r1, r2, state = asyncio.run(main())
    assert isinstance(r1, IndexError)  # computed again in the worker thread: the model's own error
    assert state == "failed"
    (here,) = predict_frames(model, [molecule(0.3)])
    assert r2[0]["energy"] == pytest.approx(here["energy"], rel=1e-12)


def test_exceptions_that_do_not_unpickle_are_sent_as_their_type_and_message():
    from app.core.errors import ServiceError
    from app.inference.procworker import portable

    e = IndexError("index 7 is out of bounds")
    assert portable(e) is e
    odd = portable(ServiceError(422, "frames[0]: bad"))
    assert isinstance(odd, RuntimeError) and "ServiceError" in str(odd) and "frames[0]: bad" in str(odd)


def test_stop_with_calls_in_the_child_answers_every_request(model):
    async def main():
        b = Batcher(model, wait_s=0.0, process="on", max_batch_atoms=6)
        b.start()
        assert await asyncio.get_running_loop().run_in_executor(None, b.process.wait_started, 120)
        pid = b.process.pid
        jobs = [asyncio.ensure_future(b.submit([molecule(0.1 * k)])) for k in range(20)]
        await asyncio.sleep(0.01)  # some calls are in the child now
        await asyncio.wait_for(b.stop(timeout=30), 60)
        done = await asyncio.wait_for(asyncio.gather(*jobs, return_exceptions=True), 10)
        return done, pid

    done, pid = asyncio.run(main())
    assert all(isinstance(r, list) for r in done), done  # drained, not dropped
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)


def test_frames_and_results_cross_the_socket_as_flat_arrays_unchanged(model):
    import pickle

    from app.inference import procworker

    box = Frame(types=np.array([0, 1, 1]), positions=molecule(0.2).positions, cell=np.eye(3) * 9.0,
                pbc=np.array([True, True, False]))
    frames = [molecule(0.0), box, molecule(0.4)]
    back = procworker._decode_frames(pickle.loads(pickle.dumps(procworker._encode_frames(frames))))
    for f, g in zip(frames, back, strict=True):
        np.testing.assert_array_equal(f.types, g.types)
        np.testing.assert_array_equal(f.positions, g.positions)
        assert (f.cell is None) == (g.cell is None) and (f.pbc is None) == (g.pbc is None)
    np.testing.assert_array_equal(back[1].cell, box.cell)
    np.testing.assert_array_equal(back[1].pbc, box.pbc)
    for ae in (False, True):
        ref = predict_frames(model, frames, atomic_energies=ae)
        enc = procworker._encode_results(ref, np.array([3, 3, 3]))
        got = procworker._decode_results(pickle.loads(pickle.dumps(enc)))
        for r, g in zip(ref, got, strict=True):
            assert sorted(r) == sorted(g)
            assert g["energy"] == r["energy"] and g["n_dropped"] == r["n_dropped"]
            for k in ("forces", "virial") + (("atomic_energies",) if ae else ()):
                np.testing.assert_array_equal(g[k], r[k])


def test_model_process_max_bounds_the_children_of_all_models(model):
    first, second = ModelProcess(model, max_processes=1), ModelProcess(model, max_processes=1)
    try:
        assert first.wait_started(120)
        second.ensure_started()
        assert second.state == "idle"  # no slot: its calls stay in the worker thread
        first.close_now()  # the slot is free again
        assert second.wait_started(120)
    finally:
        first.close_now()
        second.close_now()


def test_a_child_that_fails_to_start_gives_its_slot_back_and_backs_off(model):
    refused, other = ModelProcess(model, max_processes=1), ModelProcess(model, max_processes=1)
    refused.sha256 = "0" * 64
    try:
        assert not refused.wait_started(120)
        assert refused.state == "failed"
        assert other.wait_started(120)  # the failed start holds no slot
        refused.restart_after_s = 10.0
        assert refused._backoff() == 10.0
        refused._failed_starts = 3
        assert refused._backoff() == 40.0
    finally:
        refused.close_now()
        other.close_now()


def test_bad_model_process_settings_are_refused_naming_the_field_and_the_choices():
    from pydantic import ValidationError

    from app.core.config import Settings

    with pytest.raises(ValidationError) as e:
        Settings(model_process="sometimes")
    assert "model_process" in str(e.value) and "'auto', 'on' or 'off'" in str(e.value)
    for field in ("model_process_max", "model_process_threads", "model_process_max_atoms"):
        with pytest.raises(ValidationError, match=field):
            Settings(**{field: 0})
    with pytest.raises(ValueError, match="'off', 'auto', 'on'"):
        Batcher(object(), process="sometimes")
