"""The onnxruntime sessions a model serves with keep no per-shape state: ragged batches give a new input shape
on nearly every run, and onnxruntime's memory-pattern cache (one plan per shape set, never evicted) made the
server's memory climb for as long as it ran (issue 6)."""

from __future__ import annotations

from app.inference.model import DeepPotModel


def _sessions(model):
    yield "full graph", model.session
    if model.compressed is not None:
        yield "compressed fitting", model.compressed.session


def test_every_session_runs_without_memory_patterns_or_arena(tiny_store):
    seen = 0
    for name, compression in (("water-se-tiny", "on"), ("water-locframe-tiny", "auto")):
        model = DeepPotModel.load(tiny_store / name / "1", device="cpu", intra_op_threads=1, compression=compression)
        for what, session in _sessions(model):
            opts = session.get_session_options()
            assert opts.enable_mem_pattern is False, (name, what)
            assert opts.enable_cpu_mem_arena is False, (name, what)
            seen += 1
    assert seen == 3  # both full graphs and the compressed fitting graph were checked
