"""DPServeCalculator: the same numbers as /predict, ASE's stress convention, ASE's caching, and forces and
stress that are derivatives of the energy it returns (through HTTP, float64 tiny models)."""

from __future__ import annotations

import numpy as np
import pytest
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.fd import calculate_numerical_stress

from app.client import Client, DPServeCalculator
from tests.client.conftest import LOCFRAME, SE, sheared_box, water_box, water_cluster, water_molecule


def _calc(app_client, model=SE, encoding="msgpack"):
    return DPServeCalculator(model=model, client=Client(http_client=app_client, encoding=encoding))


@pytest.mark.parametrize("model", [SE, LOCFRAME])
def test_energy_forces_stress_equal_predict(app_client, model):
    atoms = sheared_box()
    atoms.calc = _calc(app_client, model)
    ref = Client(http_client=app_client).predict(atoms, properties=["energy", "forces", "virial", "stress"],
                                                 model=model)
    assert atoms.get_potential_energy() == ref["energy"]
    assert atoms.get_potential_energy(force_consistent=True) == ref["energy"]  # free_energy
    np.testing.assert_array_equal(atoms.get_forces(), ref["forces"])
    np.testing.assert_allclose(atoms.get_stress(), ref["stress"], rtol=1e-12, atol=1e-15)
    assert atoms.calc.model_info == {"name": model, "version": "1"}


def test_stress_is_minus_virial_over_volume_in_voigt_order(app_client):
    atoms = sheared_box()
    atoms.calc = _calc(app_client)
    xi = Client(http_client=app_client).predict(atoms, properties=["virial"], model=SE)["virial"]
    s = -0.5 * (xi + xi.T) / atoms.get_volume()
    expected = [s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]]  # xx yy zz yz xz xy
    np.testing.assert_allclose(atoms.get_stress(voigt=True), expected, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(atoms.get_stress(voigt=False), s, rtol=1e-12, atol=1e-15)


def test_stress_equals_the_strain_derivative_of_the_energy(app_client):
    atoms = sheared_box()
    atoms.calc = _calc(app_client)
    analytic = atoms.get_stress()
    numeric = calculate_numerical_stress(atoms, eps=1e-5)  # (E(+eps) - E(-eps)) / (2 eps V), free_energy
    np.testing.assert_allclose(analytic, numeric, rtol=0, atol=2e-7)


def test_unchanged_atoms_cost_no_request(app_client):
    atoms = water_box()
    calc = atoms.calc = _calc(app_client)
    e = atoms.get_potential_energy()
    assert calc.requests == 1
    assert atoms.get_potential_energy() == e
    atoms.get_forces()
    atoms.get_stress()
    assert calc.requests == 1  # energy, forces and stress came with the first request
    atoms.get_potential_energies()
    assert calc.requests == 2  # per-atom energies are fetched only when asked for
    atoms.get_potential_energy()
    assert calc.requests == 2
    atoms.positions[0, 0] += 0.01
    atoms.get_forces()
    assert calc.requests == 3  # moved atoms: a new request


def test_per_atom_energies_add_up_to_the_energy(app_client):
    atoms = water_box()
    atoms.calc = _calc(app_client, LOCFRAME, encoding="json")
    energies = atoms.get_potential_energies()
    assert energies.shape == (192,)
    assert energies.sum() == pytest.approx(atoms.get_potential_energy(), rel=1e-10)


def test_isolated_molecule_has_no_stress_and_zero_net_force(app_client):
    atoms = water_molecule()
    atoms.calc = _calc(app_client)
    f = atoms.get_forces()
    np.testing.assert_allclose(f.sum(axis=0), 0.0, atol=1e-10)  # translation invariance
    with pytest.raises(PropertyNotImplementedError, match="periodic"):
        atoms.get_stress()


def test_forces_match_finite_differences_of_the_energy(app_client):
    """F = -dE/dr, with E from get_potential_energy() through HTTP: central differences, h = 1e-5 A."""
    atoms = water_cluster(3)
    atoms.calc = _calc(app_client)
    forces = atoms.get_forces()
    h = 1e-5
    numeric = np.zeros_like(forces)
    for i in range(len(atoms)):
        for k in range(3):
            e = []
            for sign in (1, -1):
                a = atoms.copy()
                a.calc = atoms.calc
                a.positions[i, k] += sign * h
                e.append(a.get_potential_energy())
            numeric[i, k] = -(e[0] - e[1]) / (2 * h)
    np.testing.assert_allclose(forces, numeric, rtol=0, atol=1e-6)
    assert np.abs(forces).max() > 1e-2  # not trivially zero


def test_periodic_forces_match_finite_differences(app_client):
    atoms = water_box()
    atoms.calc = _calc(app_client)
    forces = atoms.get_forces()
    h = 1e-5
    for i, k in [(0, 0), (70, 1), (191, 2)]:
        e = []
        for sign in (1, -1):
            a = atoms.copy()
            a.calc = atoms.calc
            a.positions[i, k] += sign * h
            e.append(a.get_potential_energy())
        assert -(e[0] - e[1]) / (2 * h) == pytest.approx(forces[i, k], abs=1e-6)
