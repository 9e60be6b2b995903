"""Forces and virial from per-pair energy derivatives.

The energy depends on positions only through the pair vectors rij = r_j + S @ cell - r_i. Given
dE/drij for every neighbour slot of every centre atom i::

    F_i = -dE/dr_i = + sum_j dE/drij          F_j = -dE/dr_j = - dE/drij  (for each pair)

A homogeneous strain eps maps every pair vector to rij (1 + eps) (row vectors), so the virial in the
DeePMD data convention, Xi = -dE/d(eps) at eps = 0, is::

    Xi_ab = - sum_(i, j) rij_a dE/drij_b

Periodic images need no special care: an image's pair vector strains like any other. Stress in ASE's
convention is -Xi / V.
"""

from __future__ import annotations

import numpy as np

from .environment import Slots

__all__ = ["accumulate_forces_virial"]


def accumulate_forces_virial(
    slots: Slots,
    start: int,
    j_of_pair: np.ndarray,
    dEdr: np.ndarray,
    forces: np.ndarray,
    virial: np.ndarray,
) -> None:
    """Add one chunk's contribution to ``forces`` (N, 3) and ``virial`` (3, 3), in place.

    ``slots`` and ``dEdr`` (n, nslot, 3) belong to centre atoms start .. start + n; ``j_of_pair`` is the
    neighbour list's ``j`` array (indexed by ``slots.pair``).
    """
    n, nslot = slots.pair.shape
    m = slots.mask
    if not m.any():
        return
    # (3, n * nslot): each Cartesian component contiguous, masked so that empty slots add nothing
    g = np.empty((3, n * nslot))
    np.multiply(np.moveaxis(dEdr, -1, 0).reshape(3, n, nslot), m, out=g.reshape(3, n, nslot))
    jj = j_of_pair[np.where(m, slots.pair, 0)].reshape(-1)  # (n * nslot,) neighbour atom of each slot
    N = forces.shape[0]
    for c in range(3):
        forces[start : start + n, c] += g[c].reshape(n, nslot).sum(axis=1)
        forces[:, c] -= np.bincount(jj, weights=g[c], minlength=N)
    virial -= (g @ slots.rij.reshape(-1, 3)).T  # Xi_ab = -sum rij_a dE/drij_b


def atomic_virials(slots: Slots, dEdr: np.ndarray) -> np.ndarray:
    """Per-centre-atom virial (n, 3, 3): the pair terms attributed to the centre atom (sums to Xi)."""
    return -np.einsum("nka,nkb->nab", slots.rij, dEdr * slots.mask[..., None])
