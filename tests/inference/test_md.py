"""Energy conservation in NVE dynamics with an exported smooth (se_e2_a) model, in-process through the ASE
calculator: forces are exactly -dE/dr, so velocity Verlet conserves the total energy to O(dt^2)."""

import numpy as np
import pytest
from ase import Atoms, units
from ase.calculators.fd import calculate_numerical_stress
from ase.md.velocitydistribution import Stationary, thermalize_momenta
from ase.md.verlet import VelocityVerlet

from app.core.units import stress_voigt
from app.inference.calculator import DeepPotCalculator
from tests.training.test_export import _cluster


def _nve(calc, dt_fs, steps):
    types, pos = _cluster()
    atoms = Atoms(["OH"[t] for t in types], positions=pos)
    atoms.calc = calc
    thermalize_momenta(atoms, temperature_K=300, rng=np.random.default_rng(0))
    Stationary(atoms)
    dyn = VelocityVerlet(atoms, timestep=dt_fs * units.fs)
    e = []
    dyn.attach(lambda: e.append(atoms.get_total_energy()), interval=1)
    dyn.run(steps)
    return np.array(e)


def test_nve_conserves_energy_with_smooth_model(tiny_store):
    calc = DeepPotCalculator(tiny_store / "water-se-tiny" / "1")
    e = _nve(calc, 0.25, 120)
    drift = np.abs(e - e[0]).max() / 9
    assert drift < 2e-4  # eV/atom over 30 fs
    # halving the step shrinks the fluctuation about fourfold (velocity Verlet is second order)
    e2 = _nve(calc, 0.125, 240)
    assert np.abs(e2 - e2[0]).max() < 0.5 * np.abs(e - e[0]).max()


def test_calculator_stress_is_minus_virial_over_volume(tiny_store):
    calc = DeepPotCalculator(tiny_store / "water-se-tiny" / "1")
    types, pos = _cluster()
    cell = np.diag([7.0, 7.5, 8.0])
    atoms = Atoms(["OH"[t] for t in types], positions=pos, cell=cell, pbc=True)
    atoms.calc = calc
    s = atoms.get_stress()
    # ASE's own finite-difference stress (strain derivative of the energy per volume)
    s_fd = calculate_numerical_stress(atoms, eps=1e-6, voigt=True)
    assert np.allclose(s, s_fd, rtol=1e-4, atol=1e-7)
    assert stress_voigt(np.eye(3), np.diag([2.0, 1.0, 1.0])) == pytest.approx([-0.5, -0.5, -0.5, 0, 0, 0])
