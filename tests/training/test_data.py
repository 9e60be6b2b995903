"""Data readers: the shared DeePMD data sets, an extxyz round trip, and malformed data sets."""

from __future__ import annotations

import shutil
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from training.data import DataError, find_systems, read_deepmd_system, read_extxyz, read_systems

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
if not DATA.is_dir():
    DATA = Path("/work/shared/data")
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="shared DFT data not available")


# ---------------------------------------------------------------------------------------------------------
# the shared data sets


@needs_data
def test_find_systems_lists_water_systems_sorted():
    assert [p.name for p in find_systems(DATA / "water")] == ["data_0", "data_1", "data_2"]


@needs_data
def test_water_systems_have_frames_atoms_and_box():
    systems = read_systems(DATA / "water")
    assert [s.nframes for s in systems] == [80, 160, 80]  # data_1 = set.000 + set.001
    for s in systems:
        assert s.natoms == 192
        assert s.type_map == ["O", "H"]
        assert (s.types == 0).sum() == 64 and (s.types == 1).sum() == 128
        assert s.coords.shape == (s.nframes, 192, 3) and s.coords.dtype == np.float64
        assert s.forces.shape == (s.nframes, 192, 3)
        assert s.energies.shape == (s.nframes,)
        assert s.pbc.all()
        np.testing.assert_allclose(s.cells, np.broadcast_to(np.eye(3) * 12.4447, s.cells.shape), atol=1e-4)
        assert s.virials is None
        assert np.all(np.abs(s.energies / s.natoms + 155.956) < 0.05)


@needs_data
def test_multiple_sets_are_concatenated_in_sorted_order():
    s = read_deepmd_system(DATA / "water" / "data_1")
    for k, name in enumerate(["set.000", "set.001"]):
        coord = np.load(DATA / "water" / "data_1" / name / "coord.npy")
        np.testing.assert_array_equal(s.coords[80 * k : 80 * (k + 1)].reshape(80, -1), coord)


@needs_data
def test_water_dplr_has_virials():
    s = read_deepmd_system(DATA / "water_dplr")
    assert (s.nframes, s.natoms) == (30, 384)
    assert s.virials.shape == (30, 3, 3)
    raw = np.load(DATA / "water_dplr" / "set.000" / "virial.npy")
    np.testing.assert_array_equal(s.virials.reshape(30, 9), raw)


@needs_data
def test_nopbc_systems_have_no_cell():
    systems = read_systems(DATA / "nopbc_combustion")
    assert [(Path(s.name).name, s.nframes, s.natoms) for s in systems] == [
        ("C1H4O2", 1250, 7),
        ("C3H3O4", 388, 10),
        ("C4H3O1", 12, 8),
    ]
    for s in systems:
        assert s.cells is None
        assert not s.pbc.any()
        assert s.type_map == ["C", "H", "O"]


# ---------------------------------------------------------------------------------------------------------
# extended XYZ


def _frames(n_frames=3, stress=True, rng=None):
    rng = rng or np.random.default_rng(0)
    frames = []
    for _ in range(n_frames):
        cell = np.diag([5.0, 6.0, 7.0]) + 0.3 * rng.standard_normal((3, 3))
        atoms = Atoms("OH2", positions=rng.uniform(0, 4, (3, 3)), cell=cell, pbc=True)
        results = {"energy": rng.normal(), "forces": rng.standard_normal((3, 3))}
        if stress:
            s = rng.standard_normal((3, 3))
            s = s + s.T
            results["stress"] = s[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]  # Voigt xx yy zz yz xz xy
        atoms.calc = SinglePointCalculator(atoms, **results)
        frames.append(atoms)
    return frames


def test_extxyz_round_trip(tmp_path):
    frames = _frames()
    ase.io.write(tmp_path / "d.xyz", frames, format="extxyz")
    s = read_extxyz(tmp_path / "d.xyz")
    assert s.type_map == ["O", "H"]
    np.testing.assert_array_equal(s.types, [0, 1, 1])
    assert (s.nframes, s.natoms) == (3, 3)
    for k, a in enumerate(frames):
        np.testing.assert_allclose(s.coords[k], a.positions, atol=1e-7)
        np.testing.assert_allclose(s.cells[k], a.cell.array, atol=1e-7)
        np.testing.assert_allclose(s.energies[k], a.get_potential_energy(), atol=1e-7)
        np.testing.assert_allclose(s.forces[k], a.get_forces(), atol=1e-7)
    assert s.pbc.all()


def test_extxyz_stress_becomes_virial_with_the_right_sign(tmp_path):
    frames = _frames()
    ase.io.write(tmp_path / "d.xyz", frames, format="extxyz")
    s = read_extxyz(tmp_path / "d.xyz")
    for k, a in enumerate(frames):
        sigma = a.get_stress(voigt=False)
        # virial = -stress * volume (ASE's stress is +(1/V) dE/d eps; the virial is -dE/d eps)
        np.testing.assert_allclose(s.virials[k], -sigma * a.get_volume(), atol=1e-6)
        # and back: stress = -virial / V
        np.testing.assert_allclose(-s.virials[k] / abs(np.linalg.det(s.cells[k])), sigma, atol=1e-7)


def test_extxyz_virial_key_is_read_as_is(tmp_path):
    frames = _frames(stress=False)
    for k, a in enumerate(frames):
        a.info["virial"] = np.arange(9.0).reshape(3, 3) + k
    ase.io.write(tmp_path / "d.xyz", frames, format="extxyz")
    s = read_extxyz(tmp_path / "d.xyz")
    for k in range(3):
        np.testing.assert_allclose(s.virials[k], np.arange(9.0).reshape(3, 3) + k)


def test_extxyz_type_map_and_isolated(tmp_path):
    atoms = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    atoms.calc = SinglePointCalculator(atoms, energy=-1.0, forces=np.zeros((3, 3)))
    ase.io.write(tmp_path / "m.xyz", [atoms, atoms], format="extxyz")
    s = read_extxyz(tmp_path / "m.xyz", type_map=["H", "O"])
    np.testing.assert_array_equal(s.types, [1, 0, 0])
    assert s.cells is None and not s.pbc.any() and s.virials is None


def test_extxyz_mixed_compositions_raise(tmp_path):
    a, b = _frames(2)
    b = Atoms("H2O", positions=b.positions, cell=b.cell, pbc=True, calculator=b.calc)
    b.calc = SinglePointCalculator(b, energy=0.0, forces=np.zeros((3, 3)))
    ase.io.write(tmp_path / "d.xyz", [a, b], format="extxyz")
    with pytest.raises(DataError, match=r"d\.xyz: frame 1 .*composition or order"):
        read_extxyz(tmp_path / "d.xyz")


def test_extxyz_without_energy_raises(tmp_path):
    atoms = Atoms("H2", positions=[[0, 0, 0], [0.74, 0, 0]])
    ase.io.write(tmp_path / "e.xyz", atoms, format="extxyz")
    with pytest.raises(DataError, match=r"e\.xyz: frame 0 has no energy"):
        read_extxyz(tmp_path / "e.xyz")


# ---------------------------------------------------------------------------------------------------------
# malformed DeePMD systems: each names the file and what is wrong


def _system(tmp_path, nframes=4, natoms=6, nopbc=False, virial=False, sets=1):
    """A small valid DeePMD system in tmp_path/sys."""
    rng = np.random.default_rng(1)
    d = tmp_path / "sys"
    d.mkdir()
    (d / "type.raw").write_text("\n".join(str(t) for t in [0] * (natoms // 3) + [1] * (natoms - natoms // 3)))
    (d / "type_map.raw").write_text("O\nH\n")
    if nopbc:
        (d / "nopbc").write_text("")
    for k in range(sets):
        s = d / f"set.{k:03d}"
        s.mkdir()
        np.save(s / "coord.npy", rng.uniform(0, 5, (nframes, 3 * natoms)).astype(np.float32))
        np.save(s / "energy.npy", rng.normal(size=nframes).astype(np.float32))
        np.save(s / "force.npy", rng.normal(size=(nframes, 3 * natoms)).astype(np.float32))
        if not nopbc:
            np.save(s / "box.npy", np.tile((np.eye(3) * 5).ravel(), (nframes, 1)).astype(np.float32))
        if virial:
            np.save(s / "virial.npy", rng.normal(size=(nframes, 9)).astype(np.float32))
    return d


def test_valid_tmp_system_reads(tmp_path):
    d = _system(tmp_path, virial=True, sets=2)
    s = read_deepmd_system(d)
    assert (s.nframes, s.natoms) == (8, 6) and s.virials.shape == (8, 3, 3)


def test_missing_type_raw(tmp_path):
    d = _system(tmp_path)
    (d / "type.raw").unlink()
    with pytest.raises(DataError, match=r"type\.raw: missing"):
        read_deepmd_system(d)


def test_missing_coord_npy(tmp_path):
    d = _system(tmp_path)
    (d / "set.000" / "coord.npy").unlink()
    with pytest.raises(DataError, match=r"set\.000/coord\.npy: missing"):
        read_deepmd_system(d)


def test_coord_shape_mismatch_with_type_raw(tmp_path):
    d = _system(tmp_path, natoms=6)
    np.save(d / "set.000" / "coord.npy", np.zeros((4, 17)))
    with pytest.raises(DataError, match=r"coord\.npy: has 17 values per frame, expected 3 x 6 atoms"):
        read_deepmd_system(d)


def test_force_shape_mismatch(tmp_path):
    d = _system(tmp_path, natoms=6)
    np.save(d / "set.000" / "force.npy", np.zeros((4, 15)))
    with pytest.raises(DataError, match=r"force\.npy: has 15 values per frame, expected 3 x 6 atoms"):
        read_deepmd_system(d)


@pytest.mark.parametrize("fname", ["energy.npy", "force.npy", "box.npy", "virial.npy"])
def test_frame_count_mismatch(tmp_path, fname):
    d = _system(tmp_path, virial=True)
    a = np.load(d / "set.000" / fname)
    np.save(d / "set.000" / fname, a[:3])
    with pytest.raises(
        DataError, match=rf"{fname.replace('.', '[.]')}: has 3 frames, but .*coord\.npy has 4"
    ):
        read_deepmd_system(d)


@pytest.mark.parametrize("fname", ["coord.npy", "energy.npy", "force.npy", "box.npy"])
def test_non_finite_values(tmp_path, fname):
    d = _system(tmp_path)
    a = np.load(d / "set.000" / fname)
    a.reshape(-1)[-1] = np.nan
    np.save(d / "set.000" / fname, a)
    with pytest.raises(
        DataError, match=rf"{fname.replace('.', '[.]')}: contains non-finite values .* frame 3"
    ):
        read_deepmd_system(d)


@pytest.mark.parametrize("bad", ["2", "-1"])
def test_type_index_outside_type_map(tmp_path, bad):
    d = _system(tmp_path)
    (d / "type.raw").write_text(f"0 0 1 1 {bad} 1\n")
    with pytest.raises(DataError, match=rf"type\.raw: type index {bad} of atom 4 is outside the type map"):
        read_deepmd_system(d)


def test_non_integer_type_raw(tmp_path):
    d = _system(tmp_path)
    (d / "type.raw").write_text("0 0 O H H H\n")
    with pytest.raises(DataError, match=r"type\.raw: type indices must be integers"):
        read_deepmd_system(d)


def test_missing_box_in_periodic_system(tmp_path):
    d = _system(tmp_path)
    (d / "set.000" / "box.npy").unlink()
    with pytest.raises(DataError, match=r"box\.npy: missing"):
        read_deepmd_system(d)


def test_nopbc_needs_no_box(tmp_path):
    s = read_deepmd_system(_system(tmp_path, nopbc=True))
    assert s.cells is None and not s.pbc.any()


def test_virial_in_some_sets_only(tmp_path):
    d = _system(tmp_path, virial=True, sets=2)
    (d / "set.001" / "virial.npy").unlink()
    with pytest.raises(DataError, match=r"set\.001/virial\.npy: missing here but present"):
        read_deepmd_system(d)


def test_no_sets(tmp_path):
    d = _system(tmp_path)
    shutil.rmtree(d / "set.000")
    with pytest.raises(DataError, match=r"sys: no set\.\* directories"):
        read_deepmd_system(d)


def test_corrupt_npy(tmp_path):
    d = _system(tmp_path)
    (d / "set.000" / "energy.npy").write_bytes(b"not an npy file")
    with pytest.raises(DataError, match=r"energy\.npy: not a readable \.npy file"):
        read_deepmd_system(d)


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)
