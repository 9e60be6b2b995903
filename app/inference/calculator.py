"""In-process ASE calculator on a model directory (no HTTP): for benchmarks, tests and local scripts.

For MD against a running service use :class:`app.client.DPServeCalculator`; both return the same numbers.

Outputs: energy and free_energy (eV), forces (N, 3) eV/A, stress (6,) eV/A^3 in ASE's sign and Voigt order
(xx, yy, zz, yz, xz, xy), stress = -virial / volume, and per-atom energies.
"""

from __future__ import annotations

import numpy as np
from ase.calculators.calculator import Calculator, all_changes

from app.core.units import stress_voigt
from app.inference.model import DeepPotModel, Frame

__all__ = ["DeepPotCalculator"]


class DeepPotCalculator(Calculator):
    implemented_properties = ["energy", "free_energy", "forces", "stress", "energies"]

    def __init__(self, model: DeepPotModel | str, device: str = "cpu", **kwargs):
        super().__init__(**kwargs)
        self.model = model if isinstance(model, DeepPotModel) else DeepPotModel.load(model, device=device)
        self._index = {e: i for i, e in enumerate(self.model.type_map)}

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        a = self.atoms
        try:
            types = np.array([self._index[s] for s in a.get_chemical_symbols()])
        except KeyError as e:
            raise ValueError(f"element {e.args[0]} is not in model {self.model.name}'s type_map {self.model.type_map}") from None
        pbc = np.asarray(a.pbc, dtype=bool)
        cell = np.asarray(a.cell.array) if pbc.any() else None
        r = self.model.predict([Frame(types, a.positions, cell, pbc)], atomic_energies=True)[0]
        self.results["energy"] = self.results["free_energy"] = r["energy"]
        self.results["forces"] = r["forces"]
        self.results["energies"] = r["atomic_energies"]
        if pbc.all():
            self.results["stress"] = stress_voigt(r["virial"], a.cell.array)
