"""ZBL short-range repulsion: forces and virial are derivatives of its energy, it vanishes beyond r_outer,
it is smooth at both switching radii, a model carrying it is unchanged on its training data."""

import numpy as np
import pytest

from app.physics.repulsion import PairRepulsion, smoothstep, zbl

SPEC = {"type": "zbl", "pairs": {"O-H": [0.55, 0.75], "H-H": [0.9, 1.2], "O-O": [1.5, 2.0]}}


def _config():
    rng = np.random.default_rng(3)
    types = np.array([0, 1, 1, 0, 1, 1])
    pos = np.array([[0, 0, 0], [0.6, 0.1, 0], [-0.2, 0.5, 0.1], [1.7, 0.2, 0.3], [1.9, 1.0, 0], [0.3, 1.1, 0.7]])
    return types, pos + 0.01 * rng.normal(size=pos.shape)


def test_zbl_is_the_tabulated_universal_potential():
    e, de = zbl(np.array([1.0]), np.array([8.0]), np.array([1.0]))
    # 14.40 * 8 / 1 A * phi(1 / a), a = 0.4685 / (8^0.23 + 1) = 0.179 A, phi(5.58) = 0.0414: 4.77 eV
    assert e[0] == pytest.approx(4.77, abs=0.01) and de[0] < 0
    h = 1e-6
    ep, _ = zbl(np.array([1.0 + h]), np.array([8.0]), np.array([1.0]))
    em, _ = zbl(np.array([1.0 - h]), np.array([8.0]), np.array([1.0]))
    assert (ep - em)[0] / (2 * h) == pytest.approx(de[0], rel=1e-6)


def test_switch_is_c2():
    r = np.array([0.5, 0.5 + 1e-9, 0.7, 1.0 - 1e-9, 1.0, 1.3])
    s, ds = smoothstep(r, np.full(6, 0.5), np.full(6, 1.0))
    assert s[0] == 1 and s[-1] == 0 and s[-2] == 0 and abs(ds[1]) < 1e-12 and abs(ds[3]) < 1e-12


@pytest.mark.parametrize("periodic", [False, True])
def test_forces_and_virial_are_derivatives_of_the_energy(periodic):
    rep = PairRepulsion(["O", "H"], SPEC)
    types, pos = _config()
    cell = np.array([[3.2, 0, 0], [0.4, 3.0, 0], [0.2, -0.3, 3.4]]) if periodic else None
    pbc = np.array([True] * 3) if periodic else None
    e, f, v = rep.compute(types, pos, cell, pbc)
    assert e.sum() > 1.0  # pairs inside r_inner: a real repulsion
    h = 1e-6
    for a in range(len(types)):
        for x in range(3):
            p = pos.copy()
            p[a, x] += h
            ep = rep.compute(types, p, cell, pbc)[0].sum()
            p[a, x] -= 2 * h
            em = rep.compute(types, p, cell, pbc)[0].sum()
            assert -(ep - em) / (2 * h) == pytest.approx(f[a, x], rel=1e-5, abs=1e-6)
    if periodic:
        for a, b in [(0, 0), (1, 2), (2, 0)]:
            eps = np.zeros((3, 3))
            eps[a, b] = h
            es = [rep.compute(types, pos @ (np.eye(3) + s * eps), cell @ (np.eye(3) + s * eps), pbc)[0].sum()
                  for s in (1, -1)]
            assert -(es[0] - es[1]) / (2 * h) == pytest.approx(v[a, b], rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(f.sum(0), 0, atol=1e-9)


def test_nothing_beyond_r_outer():
    rep = PairRepulsion(["O", "H"], SPEC)
    types = np.array([0, 1, 1])
    pos = np.array([[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])  # a water molecule: O-H 0.96, H-H 1.52
    e, f, v = rep.compute(types, pos)
    assert not e.any() and not f.any() and not v.any()


def test_bad_specs_are_refused():
    with pytest.raises(ValueError, match="r_inner < r_outer"):
        PairRepulsion(["O", "H"], {"type": "zbl", "pairs": {"O-H": [0.8, 0.5]}})
    with pytest.raises(ValueError, match="type_map"):
        PairRepulsion(["O", "H"], {"type": "zbl", "pairs": {"O-C": [0.5, 0.8]}})
    with pytest.raises(ValueError, match="zbl"):
        PairRepulsion(["O", "H"], {"type": "lj"})


def test_exported_model_carries_repulsion_only_below_its_data(tiny_store):
    import json

    from app.inference.model import DeepPotModel, Frame
    from tests.training.test_export import _cluster

    for name in ("water-se-tiny", "water-locframe-tiny"):
        d = tiny_store / name / "1"
        m = json.loads((d / "manifest.json").read_text())
        rep = m["repulsion"]
        for key, (r_in, r_out) in rep["pairs"].items():
            assert r_in < r_out < rep["closest_in_training_data"][key]
        model = DeepPotModel.load(d, device="cpu")
        types, pos = _cluster()
        e_data = model.repulsion.compute(types, pos)[0]
        assert not e_data.any()  # untouched where the data are
        squeezed = pos.copy()
        squeezed[1] = squeezed[0] + np.array([0.35, 0.1, 0.0])  # O-H at 0.36 A
        r = model.predict([Frame(types, squeezed)], atomic_energies=True)[0]
        e_rep = model.repulsion.compute(types, squeezed)[0]
        assert e_rep.sum() > 20  # a wall of tens of eV
        h = 1e-5
        for a, x in [(0, 0), (1, 0), (1, 1)]:
            es = []
            for s in (1, -1):
                p = squeezed.copy()
                p[a, x] += s * h
                es.append(model.predict([Frame(types, p)])[0]["energy"])
            assert -(es[0] - es[1]) / (2 * h) == pytest.approx(r["forces"][a, x], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("pairs,fragment", [
    ({"O-H": [0.8, 0.5]}, "bad repulsion section"),
    ({"O-X": [0.5, 0.8]}, "bad repulsion section"),
    ({"O-H": [0.5, 7.0]}, "beyond the model's cutoff"),
])
def test_a_manifest_with_a_bad_repulsion_is_refused_with_the_reason(tiny_store, tmp_path, pairs, fragment):
    import json
    import shutil

    from app.inference.model import DeepPotModel, ModelLoadError

    d = tmp_path / "m"
    shutil.copytree(tiny_store / "water-se-tiny" / "1", d)
    m = json.loads((d / "manifest.json").read_text())
    m["repulsion"] = {"type": "zbl", "pairs": pairs}
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelLoadError, match=fragment):
        DeepPotModel.load(d, device="cpu")
