"""The cross-request batcher: concurrent submissions share one model call, results are split back in order
and do not depend on the partners, and a failure stays with the request that caused it."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from app.inference.batcher import Batcher
from app.inference.model import DeepPotModel, Frame


@pytest.fixture(scope="module")
def model(tiny_store):
    return DeepPotModel.load(tiny_store / "water-se-tiny" / "1", device="cpu", intra_op_threads=1)


def molecule(shift: float, n: int = 1) -> Frame:
    base = np.array([[0.0, 0.0, 0.0], [0.7572, 0.5865, 0.0], [-0.7572, 0.5865, 0.0]])
    pos = np.concatenate([base + [shift + 3.1 * k, 0.2 * k, 0.0] for k in range(n)])
    return Frame(types=np.tile([0, 1, 1], n), positions=pos)


class Counting:
    """Wraps a model's predict to count calls and frames, optionally failing on a marked frame."""

    def __init__(self, model, fail_on=None):
        self.model, self.calls, self.fail_on = model, [], fail_on

    def __getattr__(self, name):
        return getattr(self.model, name)

    def predict(self, frames, **kw):
        self.calls.append(len(frames))
        if self.fail_on is not None and any(f is self.fail_on for f in frames):
            raise RuntimeError("boom")
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
    assert counting.calls == [6]  # one call, six frames
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
    assert counting.calls == [2, 2, 1]


def test_a_failing_request_does_not_fail_its_partners(model):
    bad = molecule(0.0)
    counting = Counting(model, fail_on=bad)
    jobs = [([molecule(0.5)], False), ([bad], False), ([molecule(0.7)], False)]
    out = asyncio.run(_gather(Batcher(counting, wait_s=0.0), jobs))
    assert isinstance(out[1], RuntimeError)
    assert isinstance(out[0], list) and isinstance(out[2], list)
    assert counting.calls == [3, 1, 1, 1]  # the batch, then each request alone
