"""The cross-request batcher: concurrent submissions share one model call, results are split back in order
and do not depend on the partners, and a failure stays with the request that caused it. Also the packing
of small isolated frames into one packed frame."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from app.inference.batcher import Batcher
from app.inference.model import DeepPotModel, Frame
from app.inference.packing import predict_frames


@pytest.fixture(scope="module")
def model(tiny_store):
    return DeepPotModel.load(tiny_store / "water-se-tiny" / "1", device="cpu", intra_op_threads=1)


def molecule(shift: float, n: int = 1) -> Frame:
    base = np.array([[0.0, 0.0, 0.0], [0.7572, 0.5865, 0.0], [-0.7572, 0.5865, 0.0]])
    pos = np.concatenate([base + [shift + 3.1 * k, 0.2 * k, 0.0] for k in range(n)])
    return Frame(types=np.tile([0, 1, 1], n), positions=pos)


class Counting:
    """Wraps a model's predict to count its calls (and the atoms of each)."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def predict(self, frames, **kw):
        self.calls.append(sum(len(f.types) for f in frames))
        return self.model.predict(frames, **kw)


async def _gather(batcher, jobs):
    batcher.start()
    try:
        return await asyncio.gather(*(batcher.submit(f, atomic_energies=ae) for f, ae in jobs), return_exceptions=True)
    finally:
        await batcher.stop()


def test_concurrent_submissions_share_one_model_call(model):
    counting = Counting(model)
    jobs = [([molecule(0.1 * k, n=1 + k % 3)], k == 2) for k in range(6)]
    out = asyncio.run(_gather(Batcher(counting, wait_s=0.01), jobs))
    assert counting.calls == [3 * (1 + 2 + 3) * 2]  # one call with all six requests' atoms
    for (frames, ae), res in zip(jobs, out, strict=True):
        (alone,) = model.predict(frames, atomic_energies=ae)
        assert ("atomic_energies" in res[0]) == ae
        assert res[0]["energy"] == pytest.approx(alone["energy"], rel=1e-12)
        np.testing.assert_allclose(res[0]["forces"], alone["forces"], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(res[0]["virial"], alone["virial"], rtol=1e-9, atol=1e-12)


def test_max_batch_atoms_bounds_a_model_call(model):
    counting = Counting(model)
    jobs = [([molecule(0.0, n=2)], False) for _ in range(5)]  # 6 atoms each
    asyncio.run(_gather(Batcher(counting, wait_s=0.0, max_batch_atoms=12), jobs))
    assert counting.calls == [12, 12, 6]


def test_a_failing_request_does_not_fail_its_partners(model):
    bad = Frame(types=np.array([0, 1, 7]), positions=molecule(0.0).positions)  # element index 7: predict fails
    counting = Counting(model)
    jobs = [([molecule(0.5)], False), ([bad], False), ([molecule(0.7)], False)]
    out = asyncio.run(_gather(Batcher(counting, wait_s=0.0), jobs))
    assert isinstance(out[1], IndexError)
    assert isinstance(out[0], list) and isinstance(out[2], list)
    (alone,) = model.predict([molecule(0.5)])
    assert out[0][0]["energy"] == pytest.approx(alone["energy"], rel=1e-12)
    assert counting.calls == [9, 3, 3, 3]  # the batch, then each request alone


def test_packed_frames_equal_predict_of_each_frame(model):
    """Small isolated frames packed side by side give predict's numbers, virial included; periodic and
    large frames pass through."""
    rng = np.random.default_rng(3)
    frames = []
    for n in (1, 2, 4):
        rot = np.linalg.qr(rng.normal(size=(3, 3)))[0]
        m = molecule(0.0, n)
        frames.append(Frame(types=m.types, positions=m.positions @ rot.T + rng.normal(size=3) * 30))
    frames.append(Frame(types=np.array([0]), positions=np.array([[1.0, 2.0, 3.0]])))  # one atom
    box = molecule(0.0, 2)
    frames.append(Frame(types=box.types, positions=box.positions, cell=np.eye(3) * 9.0, pbc=np.ones(3, bool)))
    ref = model.predict(frames, atomic_energies=True)
    got = predict_frames(model, frames, atomic_energies=True)
    for r, g in zip(ref, got, strict=True):
        assert g["energy"] == pytest.approx(r["energy"], rel=1e-12)
        for k in ("forces", "virial", "atomic_energies"):
            np.testing.assert_allclose(g[k], r[k], rtol=1e-9, atol=1e-12)
        assert g["n_dropped"] == r["n_dropped"] == 0
    assert "atomic_energies" not in predict_frames(model, frames[:1])[0]


def test_packed_frames_report_dropped_neighbours_per_frame(model):
    """A frame denser than the model's sel (64 O on a 1.5 A grid: up to 63 O neighbours, sel 46) next to
    an ordinary molecule: n_dropped stays with the dense frame."""
    grid = np.stack(np.meshgrid(*[np.arange(4)] * 3, indexing="ij"), -1).reshape(-1, 3) * 1.5
    dense = Frame(types=np.zeros(64, dtype=np.int64), positions=grid.astype(np.float64))
    frames = [molecule(0.0), dense]
    ref = model.predict(frames)
    got = predict_frames(model, frames)
    assert ref[1]["n_dropped"] > 0
    assert [g["n_dropped"] for g in got] == [0, ref[1]["n_dropped"]]
    for r, g in zip(ref, got, strict=True):
        assert g["energy"] == pytest.approx(r["energy"], rel=1e-12)
        np.testing.assert_allclose(g["forces"], r["forces"], rtol=1e-9, atol=1e-12)
