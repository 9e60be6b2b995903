"""Exported models, loaded as the server loads them: parity with torch, forces = -dE/dr, virial = strain
derivative, bias and normalisation round-trip through the manifest, a refused corrupted model."""

import json
import shutil

import numpy as np
import pytest
import torch

from app.inference.model import DeepPotModel, Frame, ModelLoadError
from tests.conftest import WATER

MODELS = ["water-locframe-tiny", "water-se-tiny"]


def _water_frame(k=0):
    coord = np.load(WATER / "data_0/set.000/coord.npy")[k].reshape(-1, 3).astype(np.float64)
    box = np.load(WATER / "data_0/set.000/box.npy")[k].reshape(3, 3).astype(np.float64)
    types = np.loadtxt(WATER / "data_0/type.raw", dtype=int)
    return types, coord, box


def _cluster():
    """Three water molecules taken from the box, as an isolated cluster."""
    types, coord, _ = _water_frame()
    # type.raw lists 64 O then 128 H; molecule m: O m, H 64 + 2m, H 65 + 2m (nearest H of each O)
    idx = []
    for o in (0, 1, 2):
        d = np.linalg.norm(coord[64:] - coord[o], axis=1)
        idx += [o, *(64 + np.argsort(d)[:2])]
    idx = np.array(idx)
    return types[idx], coord[idx] - coord[idx].mean(0)


@pytest.mark.parametrize("name", MODELS)
def test_export_check_onnx_matches_torch(tiny_store, name):
    m = json.loads((tiny_store / name / "1" / "manifest.json").read_text())
    chk = m["export_check"]
    assert chk["frames"] >= 1
    assert chk["max_energy_diff_per_atom_eV"] < 1e-10
    assert chk["max_force_diff_eV_per_A"] < 1e-9
    val = m["metrics"]["validation"]  # dp-test figures on the held-out frames, as served
    assert val["frames"] >= 1 and val["force_rmse"] > 0


@pytest.mark.parametrize("name", MODELS)
def test_forces_match_finite_difference_of_exported_energy(tiny_store, name):
    model = DeepPotModel.load(tiny_store / name / "1", device="cpu")
    types, pos = _cluster()
    f = model.predict([Frame(types, pos)])[0]["forces"]
    h = 1e-5
    for a, x in [(0, 0), (1, 1), (4, 2), (8, 0)]:
        p = pos.copy()
        p[a, x] += h
        ep = model.predict([Frame(types, p)])[0]["energy"]
        p[a, x] -= 2 * h
        em = model.predict([Frame(types, p)])[0]["energy"]
        assert -(ep - em) / (2 * h) == pytest.approx(f[a, x], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("name", MODELS)
def test_virial_matches_strain_derivative_of_exported_energy(tiny_store, name):
    model = DeepPotModel.load(tiny_store / name / "1", device="cpu")
    # a few molecules in a small triclinic cell (each sees many images): few near-ties in neighbour rank,
    # which would make loc_frame's energy jump (its known weakness) inside the finite difference
    types, pos = _cluster()
    box = np.array([[7.0, 0.0, 0.0], [1.0, 7.5, 0.0], [0.5, -0.8, 8.0]])
    v = model.predict([Frame(types, pos, box)])[0]["virial"]
    h = 1e-6
    for a, b in [(0, 0), (1, 2), (2, 1)]:
        eps = np.zeros((3, 3))
        eps[a, b] = h
        e = []
        for s in (1, -1):
            m = np.eye(3) + s * eps
            e.append(model.predict([Frame(types, pos @ m, box @ m)])[0]["energy"])
        assert -(e[0] - e[1]) / (2 * h) == pytest.approx(v[a, b], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_energy_bias_and_normalisation_round_trip_through_manifest(tiny_store, name):
    m = json.loads((tiny_store / name / "1" / "manifest.json").read_text())
    ckpt = torch.load(tiny_store.parent / name / "checkpoint.pt", weights_only=False)
    assert [m["energy_bias"][e] for e in ckpt["type_map"]] == pytest.approx(ckpt["energy_bias"], rel=0, abs=0)
    model = DeepPotModel.load(tiny_store / name / "1", device="cpu")
    assert model.energy_bias.tolist() == ckpt["energy_bias"]
    if m["descriptor"]["type"] == "loc_frame":
        for t, e in enumerate(ckpt["type_map"]):
            assert np.allclose(m["normalisation"][e]["std"], ckpt["net_state"]["std"][t].numpy())
            assert np.allclose(m["normalisation"][e]["mean"], ckpt["net_state"]["mean"][t].numpy())
    else:
        std = ckpt["net_state"]["std"]
        assert m["normalisation"]["std_s_and_xyz"]["O"]["H"][0] == pytest.approx(float(std[0, 46, 0]))
    # the bias must matter: an empty-neighbourhood atom's energy is the network's constant plus its bias
    assert abs(m["energy_bias"]["O"]) > 1.0


def test_corrupted_model_is_refused_with_reason(tiny_store, tmp_path):
    src = tiny_store / "water-se-tiny" / "1"
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    data = (bad / "model.onnx").read_bytes()
    (bad / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="checksum"):
        DeepPotModel.load(bad, device="cpu")
    m = json.loads((src / "manifest.json").read_text())
    m["onnx"]["sha256"] = "0" * 64
    shutil.copy(src / "model.onnx", bad / "model.onnx")
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelLoadError, match="checksum mismatch"):
        DeepPotModel.load(bad, device="cpu")


def test_float32_and_float64_exports_agree(tiny_store, tmp_path):
    from training.export import export_checkpoint

    ck = tiny_store.parent / "water-se-tiny" / "checkpoint.pt"
    d32 = export_checkpoint(ck, "w", "32", store=tmp_path, precision="float32", check_frames=1, log=lambda *a: None)
    m32 = DeepPotModel.load(d32, device="cpu")
    m64 = DeepPotModel.load(tiny_store / "water-se-tiny" / "1", device="cpu")
    types, pos, box = _water_frame(1)
    r32 = m32.predict([Frame(types, pos, box)])[0]
    r64 = m64.predict([Frame(types, pos, box)])[0]
    assert abs(r32["energy"] - r64["energy"]) / len(types) < 1e-5
    assert np.abs(r32["forces"] - r64["forces"]).max() < 1e-4
    with pytest.raises(FileExistsError):
        export_checkpoint(ck, "w", "32", store=tmp_path, precision="float32", check_frames=1, log=lambda *a: None)
