"""Compressed se_e2_a (tabulated embeddings fused with the descriptor): the tables against the networks,
the compressed model against the full graph, forces and virial as derivatives of the compressed energy, the
linear continuation below r_min, integrity of the extra files."""

import json
import shutil

import numpy as np
import pytest

from app.inference.compressed import EmbeddingTable, embedding_forward
from app.inference.model import DeepPotModel, Frame, ModelLoadError
from tests.training.test_export import _cluster, _water_frame

SE = "water-se-tiny"


def _layers(model):
    z = np.load(model.directory / "embedding.npz")
    return [[{"w": z[f"embed{t}_w{i}"], "b": z[f"embed{t}_b{i}"], "kind": str(z[f"embed{t}_kind{i}"])}
             for i in range(int(z[f"embed{t}_nlayers"]))] for t in range(int(z["ntypes"]))]


def test_embedding_derivatives_are_those_of_the_network(tiny_store):
    layers = _layers(DeepPotModel.load(tiny_store / SE / "1", device="cpu", compression="off"))[0]
    x = np.linspace(0.05, 8, 9)
    g, d1, d2 = embedding_forward(layers, x)
    h = 1e-5
    gp, _, _ = embedding_forward(layers, x + h)
    gm, _, _ = embedding_forward(layers, x - h)
    np.testing.assert_allclose((gp - gm) / (2 * h), d1, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose((gp - 2 * g + gm) / h**2, d2, rtol=1e-3, atol=1e-5)


def test_table_matches_network_and_is_smooth_at_nodes(tiny_store):
    layers = _layers(DeepPotModel.load(tiny_store / SE / "1", device="cpu", compression="off"))
    table = EmbeddingTable(layers, np.array([30.0, 20.0]), stride=0.1)
    assert table.max_rel_error < 1e-7
    x = np.random.default_rng(0).uniform(0, table.x_max, 2000)
    for t in range(2):
        g, dg = table.evaluate(t, x)
        ge, dge, _ = embedding_forward(layers[t], x)
        assert np.abs(g - ge).max() < 1e-7 * max(1, np.abs(ge).max())
        assert np.abs(dg - dge).max() < 1e-6 * max(1, np.abs(dge).max())
        # value and slope continuous across bin edges (C1 and, by construction, C2)
        nodes = np.arange(1, 50) * table.stride
        left, dleft = table.evaluate(t, nodes - 1e-12)
        right, dright = table.evaluate(t, nodes + 1e-12)
        assert np.abs(left - right).max() < 1e-9 and np.abs(dleft - dright).max() < 1e-8
        # beyond x_max: the linear continuation, joined with value and slope
        far = np.array([table.x_max - 1e-12, table.x_max + 1e-12, table.x_max + 3.0])
        gf, dgf = table.evaluate(t, far)
        assert np.abs(gf[0] - gf[1]).max() < 1e-9 and np.abs(dgf[0] - dgf[1]).max() < 1e-8
        np.testing.assert_allclose(gf[2], gf[1] + 3.0 * dgf[1], rtol=1e-12, atol=1e-12)


def test_compressed_model_equals_the_full_graph(tiny_store):
    full = DeepPotModel.load(tiny_store / SE / "1", device="cpu", compression="off")
    comp = DeepPotModel.load(tiny_store / SE / "1", device="cpu", compression="on")
    assert full.compressed is None and comp.compressed is not None
    assert comp.info()["compressed"]["table_max_rel_error"] < 1e-7
    types, coord, box = _water_frame(3)
    ctypes, cpos = _cluster()
    frames = [Frame(types, coord, box, np.array([True] * 3)), Frame(ctypes, cpos)]
    for a, b in zip(full.predict(frames, atomic_energies=True), comp.predict(frames, atomic_energies=True), strict=True):
        np.testing.assert_allclose(b["atomic_energies"], a["atomic_energies"], rtol=0, atol=1e-8)
        np.testing.assert_allclose(b["forces"], a["forces"], rtol=0, atol=1e-7)
        np.testing.assert_allclose(b["virial"], a["virial"], rtol=0, atol=1e-6)


def test_compressed_results_do_not_depend_on_the_batch(tiny_store):
    comp = DeepPotModel.load(tiny_store / SE / "1", device="cpu", compression="on")
    types, coord, box = _water_frame(1)
    ctypes, cpos = _cluster()
    alone = comp.predict([Frame(ctypes, cpos)])[0]
    batched = comp.predict([Frame(types, coord, box, np.array([True] * 3)), Frame(ctypes, cpos)])[1]
    assert alone["energy"] == batched["energy"]
    np.testing.assert_array_equal(alone["forces"], batched["forces"])


def test_forces_below_r_min_are_derivatives_of_the_continued_energy(tiny_store):
    """Two atoms closer than the tables reach (linear continuation): forces still -dE/dr."""
    comp = DeepPotModel.load(tiny_store / SE / "1", device="cpu", compression="on", table_r_min=0.5)
    types, pos = _cluster()
    pos = pos.copy()
    pos[1] = pos[0] + np.array([0.15, 0.05, -0.02])  # an O-H pair at 0.16 A, inside r_min
    c = comp.compressed
    x = (1 / np.linalg.norm(pos[1] - pos[0])) / c.std[0, c.slot_type == 1, 0].max()  # the pair's table input seen from the O
    assert x > c.table.x_max  # really beyond the table
    f = comp.predict([Frame(types, pos)])[0]["forces"]
    h = 1e-5
    for a, x in [(0, 0), (1, 1), (1, 2), (4, 0)]:
        e = []
        for s in (1, -1):
            p = pos.copy()
            p[a, x] += s * h
            e.append(comp.predict([Frame(types, p)])[0]["energy"])
        assert -(e[0] - e[1]) / (2 * h) == pytest.approx(f[a, x], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("damage", ["embedding", "fitting"])
def test_damaged_compression_files_refuse_the_model(tiny_store, tmp_path, damage):
    d = tmp_path / "m"
    shutil.copytree(tiny_store / SE / "1", d)
    m = json.loads((d / "manifest.json").read_text())
    path = d / m["compression"][damage]["file"]
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ModelLoadError, match="checksum mismatch"):
        DeepPotModel.load(d, device="cpu")
    with pytest.raises(ModelLoadError, match="checksum mismatch"):  # verified even when not used
        DeepPotModel.load(d, device="cpu", compression="off")


def test_every_kernel_the_server_calls_releases_the_gil():
    """A model call runs in a worker thread; a kernel holding the GIL stalls the event loop (/health, request
    parsing) for its whole duration. Every compiled entry point must be nogil (inline helpers compile into
    their callers)."""
    import numba

    from app.inference import compressed
    from app.physics import kernels

    checked = []
    for mod in (compressed, kernels):
        for name, f in vars(mod).items():
            if name in ("closest_dense", "small_cell_scan"):  # request validation on the event loop, tens of
                # microseconds: they keep the GIL on purpose (getting it back from a busy worker costs more)
                assert not f.targetoptions.get("nogil")
                continue
            if isinstance(f, numba.core.registry.CPUDispatcher) and f.targetoptions.get("inline") != "always":
                assert f.targetoptions.get("nogil") is True, f"{mod.__name__}.{name} holds the GIL"
                checked.append(name)
    assert {"_tab_forward", "_tab_backward", "_se_a_vjp", "_loc_frame_env"} <= set(checked)
