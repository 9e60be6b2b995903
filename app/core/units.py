"""Units and the one conversion made at the service boundary: virial -> stress.

Internal units are the wire units: Angstrom, eV, eV/Angstrom, virial in eV, stress in eV/Angstrom^3.

Virial (design.md): for a homogeneous strain epsilon applied to the cell and all positions,
``Xi = -dE/d(epsilon)`` at epsilon = 0, i.e. ``Xi_ab = -sum_g (dE/dh_ga) h_gb`` (the DeePMD ``virial.npy``
convention). For a pair-decomposed model ``Xi = -sum_(i,j) r_ij (outer) dE_i/dr_ij``.

Stress (ASE sign convention, positive under tension): ``sigma = (1/V) dE/d(epsilon) = -Xi / V``, with V the
cell volume ``|det(cell)|``; returned in ASE's Voigt order (xx, yy, zz, yz, xz, xy). Only a cell periodic in
all three directions has a volume, so stress is refused for anything else.
"""

from __future__ import annotations

import numpy as np

__all__ = ["EV_PER_A3_IN_GPA", "VOIGT_ORDER", "stress_voigt"]

EV_PER_A3_IN_GPA = 160.21766208  # 1 eV/A^3 = 160.2 GPa (to convert stress for display)
VOIGT_ORDER = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))  # xx, yy, zz, yz, xz, xy


def stress_voigt(virial: np.ndarray, cell: np.ndarray) -> np.ndarray:
    """Stress (6,) eV/A^3 in Voigt order from the virial (3, 3) eV and the cell (3, 3) rows, A:
    ``sigma = -Xi / |det(cell)|``."""
    virial = np.asarray(virial, dtype=np.float64)
    assert virial.shape == (3, 3), virial.shape
    volume = abs(float(np.linalg.det(np.asarray(cell, dtype=np.float64))))
    full = -virial / volume  # (3, 3)
    sym = 0.5 * (full + full.T)  # the virial of a rotation-invariant model is symmetric up to round-off
    return np.array([sym[a, b] for a, b in VOIGT_ORDER])  # (6,)
