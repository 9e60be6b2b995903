"""From a structurally valid request to model inputs, refusing everything a user can get wrong.

Every refusal is an :class:`~app.core.errors.InputError` (422, or 413 for sizes) whose message names the
field with its frame index and, where there is a choice, the allowed values. The checks, in order, are
chosen so that nothing expensive runs on input that could blow it up:

1. sizes (413): frames per request, atoms per frame and per request -- on the raw body, before parsing;
2. per frame: at least one atom; one position row per species entry; elements known and supported by
   the model; finite coordinates within ``max_abs_coordinate``; pbc only with a cell; a cell that is
   finite and not singular or degenerate along its periodic directions; stress only for 3D-periodic cells;
3. density: the mean number of neighbours within the model's cutoff, estimated in O(N) without forming
   pairs (:func:`~app.physics.neighbors.estimate_neighbours`), at most ``max_neighbours_per_atom``;
4. no two atoms (or an atom and its own periodic image) closer than ``min_distance``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from app.core.config import Settings
from app.core.errors import InputError, ServiceError
from app.inference.model import DeepPotModel, Frame
from app.physics.neighbors import closest_pair, estimate_neighbours, small_cell_screen
from app.schemas import PredictRequest

_COINCIDENT = 1e-6  # Angstrom: closer than this is refused whatever min_distance says

__all__ = ["check_sizes", "to_frames", "known_elements"]

_DEGENERATE = 1e-6  # |det| / (|a||b||c|) below this: the lattice vectors are (nearly) linearly dependent


def _json(pbc: np.ndarray) -> str:
    return "[" + ", ".join("true" if p else "false" for p in pbc) + "]"


@lru_cache
def known_elements() -> frozenset[str]:
    from ase.data import chemical_symbols

    return frozenset(chemical_symbols[1:])


def check_sizes(raw, settings: Settings) -> None:
    """413 for too many frames or atoms, read off the raw (unparsed) body so nothing big is built first."""
    if not isinstance(raw, dict) or not isinstance(raw.get("frames"), list):
        return  # the schema reports the structural problem
    frames = raw["frames"]
    if len(frames) > settings.max_frames_per_request:
        raise ServiceError(413, f"frames: {len(frames)} frames exceed max_frames_per_request = "
                           f"{settings.max_frames_per_request} (DPSERVE_MAX_FRAMES_PER_REQUEST); split the request")
    total = 0
    for k, f in enumerate(frames):
        species = f.get("species") if isinstance(f, dict) else None
        n = len(species) if isinstance(species, list) else 0
        if n > settings.max_atoms_per_frame:
            raise ServiceError(413, f"frames[{k}].species: {n} atoms exceed max_atoms_per_frame = "
                               f"{settings.max_atoms_per_frame} (DPSERVE_MAX_ATOMS_PER_FRAME)")
        total += n
    if total > settings.max_atoms_per_request:
        raise ServiceError(413, f"frames: {total} atoms in all exceed max_atoms_per_request = "
                           f"{settings.max_atoms_per_request} (DPSERVE_MAX_ATOMS_PER_REQUEST); split the request")


def _types(species: list[str], model: DeepPotModel, k: int) -> np.ndarray:
    """Element symbols -> indices into model.type_map, or a 422 naming the first bad entry."""
    index = {e: t for t, e in enumerate(model.type_map)}
    try:  # the common case, in one pass (np.unique on strings costs more than the whole lookup)
        return np.fromiter((index[s] for s in species), dtype=np.int64, count=len(species))
    except (KeyError, TypeError):
        pass  # find and name the first bad entry below
    symbols, inverse = np.unique(np.asarray(species, dtype=object).astype(str), return_inverse=True)
    index = {e: t for t, e in enumerate(model.type_map)}
    lookup = np.empty(len(symbols), dtype=np.int64)
    supported = ", ".join(model.type_map)
    for u, sym in enumerate(symbols.tolist()):
        if sym in index:
            lookup[u] = index[sym]
            continue
        atom = int(np.flatnonzero(inverse == u)[0])
        if sym not in known_elements():
            raise InputError(("frames", k, "species", atom),
                             f"unknown element {sym!r}; model {model.name} supports {supported}")
        raise InputError(("frames", k, "species", atom),
                         f"element {sym!r} is not supported by model {model.name}, which supports {supported}")
    return lookup[inverse.reshape(-1)]


def _check_cell(cell: np.ndarray, pbc: np.ndarray, k: int, settings: Settings) -> None:
    loc = ("frames", k, "cell")
    if not np.isfinite(cell).all():
        raise InputError(loc, "cell entries must be finite numbers (Angstrom)")
    if np.abs(cell).max() > settings.max_abs_coordinate:
        raise InputError(loc, f"cell entries must lie within +-{settings.max_abs_coordinate:g} Angstrom "
                         "(max_abs_coordinate); the cell is in Angstrom, lattice vectors as rows")
    periodic = np.flatnonzero(pbc)
    norms = np.linalg.norm(cell, axis=1)
    for a in periodic:
        if norms[a] < 1e-6:
            raise InputError((*loc, int(a)), f"lattice vector {a} is zero but pbc[{a}] is true: a periodic "
                             "direction needs a non-zero lattice vector")
    if len(periodic) == 2:
        a, b = periodic
        if np.linalg.norm(np.cross(cell[a], cell[b])) < _DEGENERATE * norms[a] * norms[b]:
            raise InputError(loc, f"degenerate cell: periodic lattice vectors {a} and {b} are parallel")
    elif len(periodic) == 3:
        volume = abs(np.linalg.det(cell))
        if volume < _DEGENERATE * np.prod(norms):
            raise InputError(loc, f"singular or degenerate cell (volume {volume:.3g} A^3): the three lattice "
                             "vectors (rows) must be linearly independent")


def to_frames(req: PredictRequest, model: DeepPotModel, settings: Settings) -> list[Frame]:
    """Validated request -> model Frames (see the module docstring for the checks)."""
    frames = []
    for k, f in enumerate(req.frames):
        n = len(f.species)
        if n == 0:
            raise InputError(("frames", k, "species"), "a frame needs at least one atom")
        pos = f.positions  # (N, 3) float64
        if len(pos) != n:
            raise InputError(("frames", k, "positions"), f"{len(pos)} position rows for {n} species: positions "
                             "needs one [x, y, z] row (Angstrom) per entry of species")
        types = _types(f.species, model, k)
        finite = np.isfinite(pos).all(axis=1)
        if not finite.all():
            atom = int(np.flatnonzero(~finite)[0])
            raise InputError(("frames", k, "positions", atom), f"coordinates must be finite numbers, got {pos[atom].tolist()}")
        big = np.abs(pos).max(axis=1) > settings.max_abs_coordinate
        if big.any():
            atom = int(np.flatnonzero(big)[0])
            raise InputError(("frames", k, "positions", atom),
                             f"coordinates {pos[atom].tolist()} lie beyond +-{settings.max_abs_coordinate:g} Angstrom "
                             "(max_abs_coordinate); positions are Cartesian, in Angstrom")
        cell = f.cell
        if f.pbc is not None:
            pbc = np.array(f.pbc, dtype=bool)
        else:
            pbc = np.ones(3, dtype=bool) if cell is not None else np.zeros(3, dtype=bool)
        if cell is None and pbc.any():
            raise InputError(("frames", k, "pbc"), f"pbc {_json(pbc)} needs a cell: send cell (3 lattice vectors "
                             "as rows, Angstrom) or pbc [false, false, false] for an isolated system")
        if cell is not None:
            _check_cell(cell, pbc, k, settings)
        if "stress" in req.properties and not pbc.all():
            what = "is isolated (no cell)" if cell is None else f"has pbc {_json(pbc)}"
            raise InputError(("properties",), f"'stress' is only defined for a cell periodic in all three "
                             f"directions, but frames[{k}] {what}; ask for 'virial' (eV) instead")
        if not pbc.any():
            cell, pbc = None, None
        # coincident atoms are refused even with min_distance = 0: every descriptor divides by the distance
        min_d = max(settings.min_distance, _COINCIDENT)
        both = small_cell_screen(pos, cell, pbc, model.rcut, min_d) if cell is not None else None
        if both is not None:
            est = both[0]
        elif cell is None and len(pos) <= settings.max_neighbours_per_atom:
            # an isolated frame of n atoms has at most n neighbours per atom (the estimate counts the atom
            # itself): no need to count them (a 7-atom molecule: 4% of the event loop under small requests)
            est = 0.0
        else:
            est = estimate_neighbours(pos, cell, pbc, model.rcut)
        if est > settings.max_neighbours_per_atom:
            raise InputError(("frames", k, "positions"),
                             f"too dense: about {est:.0f} neighbours per atom within model {model.name}'s cutoff of "
                             f"{model.rcut:g} Angstrom, more than max_neighbours_per_atom = "
                             f"{settings.max_neighbours_per_atom} (liquid water has about 90 at 6 Angstrom); are the "
                             "positions and the cell in Angstrom?")
        # only now, with the density bounded: on a pile of atoms the closest-pair search would form N^2 pairs
        pair = both[1] if both is not None else closest_pair(pos, cell, pbc, min_d)
        if pair is not None:
            i, j, d = pair
            if i == j:
                msg = (f"atom {i} is {d:.3g} Angstrom from its own periodic image, closer than min_distance = "
                       f"{min_d:g} Angstrom: the cell is too small")
                raise InputError(("frames", k, "cell"), msg)
            raise InputError(("frames", k, "positions"),
                             f"atoms {min(i, j)} and {max(i, j)} are {d:.3g} Angstrom apart, closer than "
                             f"min_distance = {min_d:g} Angstrom (atoms on top of each other)")
        frames.append(Frame(types=types, positions=pos, cell=cell, pbc=pbc))
    return frames
