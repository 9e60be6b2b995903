"""Readers for DFT training data: DeePMD npy systems and extended XYZ (pure numpy + ASE, no torch).

A *system* is a set of frames with the same atoms in the same order (DeePMD's unit of data). Everything
is returned in float64 and in the project's conventions (design.md): Angstrom, eV, eV/Angstrom; cell
vectors as rows; virial Xi = -dE/d(eps) in eV (not divided by the volume), the convention of DeePMD's
``virial.npy``.

DeePMD npy system (deepmd-kit ``doc/data/system.md``), one directory::

    type.raw          per-atom element index, whitespace separated (N,)
    type_map.raw      element names of those indices
    nopbc             optional empty marker: a non-periodic system (no box.npy needed)
    set.000/ ...      one or more sets, read in sorted order and concatenated:
        coord.npy     (F, 3N) Angstrom
        box.npy       (F, 9) Angstrom, row-major XX XY XZ YX YY YZ ZX ZY ZZ (cell vectors as rows)
        energy.npy    (F,) eV
        force.npy     (F, 3N) eV/Angstrom
        virial.npy    optional (F, 9) eV; either in every set or in none

Anything malformed raises :class:`DataError` with the offending file and what is wrong with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["DataError", "System", "find_systems", "read_deepmd_system", "read_extxyz", "read_systems"]


class DataError(ValueError):
    """A malformed data set; the message names the file and what is wrong."""


@dataclass
class System:
    """Frames of one fixed composition. F frames, N atoms.

    name: where it came from (directory or file name).
    type_map: element symbol of each type index.
    types (N,) int: type index of each atom.
    coords (F, N, 3) Angstrom; cells (F, 3, 3) Angstrom, lattice vectors as rows, or None (isolated).
    energies (F,) eV; forces (F, N, 3) eV/Angstrom; virials (F, 3, 3) eV or None when not in the data.
    pbc: three booleans; defaults to all True when there are cells and all False when there are none.
    """

    name: str
    type_map: list[str]
    types: np.ndarray
    coords: np.ndarray
    cells: np.ndarray | None
    energies: np.ndarray
    forces: np.ndarray
    virials: np.ndarray | None = None
    pbc: np.ndarray | None = None

    def __post_init__(self):
        f, n = self.coords.shape[:2]
        assert self.coords.shape == (f, n, 3), self.coords.shape
        assert self.types.shape == (n,), self.types.shape
        assert self.energies.shape == (f,), self.energies.shape
        assert self.forces.shape == (f, n, 3), self.forces.shape
        assert self.cells is None or self.cells.shape == (f, 3, 3), self.cells.shape
        assert self.virials is None or self.virials.shape == (f, 3, 3), self.virials.shape
        if self.pbc is None:
            self.pbc = np.full(3, self.cells is not None)
        self.pbc = np.asarray(self.pbc, dtype=bool).reshape(3)
        if self.pbc.any() and self.cells is None:
            raise ValueError(f"{self.name}: periodic directions need cells")

    @property
    def nframes(self) -> int:
        return self.coords.shape[0]

    @property
    def natoms(self) -> int:
        return self.coords.shape[1]

    @property
    def symbols(self) -> list[str]:
        """Element symbol of every atom (N,)."""
        return [self.type_map[t] for t in self.types]


# ---------------------------------------------------------------------------------------------------------
# DeePMD npy systems


def _read_raw_tokens(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from e


def _load_npy(path: Path) -> np.ndarray:
    try:
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable .npy file ({e})") from e
    if not np.issubdtype(a.dtype, np.number):
        raise DataError(f"{path}: expected numbers, got dtype {a.dtype}")
    a = np.asarray(a, dtype=np.float64)
    if not np.isfinite(a).all():
        first = np.flatnonzero(~np.isfinite(a))[0]
        frame = np.unravel_index(first, a.shape)[0] if a.ndim else 0
        raise DataError(f"{path}: contains non-finite values (NaN or inf), the first in frame {frame}")
    return a


def _per_frame(path: Path, a: np.ndarray, width: int, what: str) -> np.ndarray:
    """Reshape to (F, width); a 1-D array of ``width`` values is one frame (width 1: one value per frame)."""
    if a.ndim == 0 or (a.ndim == 1 and width > 1):
        a = a.reshape(1, -1)
    a = a.reshape(len(a), -1)
    if a.shape[1] != width:
        raise DataError(f"{path}: has {a.shape[1]} values per frame, expected {what}")
    return a


def _read_types(path: Path, type_map: list[str] | None) -> tuple[np.ndarray, list[str]]:
    tpath = path / "type.raw"
    if not tpath.is_file():
        raise DataError(f"{tpath}: missing (every DeePMD system needs type.raw, one type index per atom)")
    tokens = _read_raw_tokens(tpath)
    if not tokens:
        raise DataError(f"{tpath}: is empty (expected one type index per atom)")
    try:
        types = np.array([int(t) for t in tokens], dtype=np.int64)
    except ValueError as e:
        raise DataError(f"{tpath}: type indices must be integers ({e})") from e

    mpath = path / "type_map.raw"
    if mpath.is_file():
        names = _read_raw_tokens(mpath)
        if not names:
            raise DataError(f"{mpath}: is empty (expected one element symbol per type index)")
        if type_map is not None and list(type_map) != names:
            raise DataError(f"{mpath}: names {names}, which differs from the given type_map {list(type_map)}")
        where = mpath
    elif type_map is not None:
        names, where = list(type_map), "the given type_map"
    else:
        raise DataError(f"{mpath}: missing, and no type_map was given to name the type indices")
    bad = np.flatnonzero((types < 0) | (types >= len(names)))
    if len(bad):
        k = bad[0]
        raise DataError(
            f"{tpath}: type index {types[k]} of atom {k} is outside the type map "
            f"({len(names)} elements {names} in {where}; allowed 0..{len(names) - 1})"
        )
    return types, names


def read_deepmd_system(path, type_map: list[str] | None = None) -> System:
    """Read one DeePMD npy system directory (format in the module docstring).

    ``type_map`` is only needed when the directory has no type_map.raw; when both exist they must agree.
    Sets are concatenated in sorted order. With a ``nopbc`` marker the system is isolated: ``cells`` is
    None and ``pbc`` all False (a box.npy, if present, is ignored, as deepmd-kit does).
    """
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: not a directory (a DeePMD system is a directory holding type.raw)")
    types, names = _read_types(path, type_map)
    natoms = len(types)
    nopbc = (path / "nopbc").exists()
    sets = sorted(p for p in path.glob("set.*") if p.is_dir())
    if not sets:
        raise DataError(f"{path}: no set.* directories with frames")

    coords, cells, energies, forces, virials = [], [], [], [], []
    has_virial = None
    for s in sets:

        def need(fname, s=s):
            p = s / fname
            if not p.is_file():
                raise DataError(f"{p}: missing")
            return p

        p = need("coord.npy")
        coord = _per_frame(p, _load_npy(p), 3 * natoms, f"3 x {natoms} atoms (from type.raw)")
        nf = len(coord)

        def frames(fname, width, what, nf=nf, s=s):
            p = need(fname)
            a = _per_frame(p, _load_npy(p), width, what)
            if len(a) != nf:
                raise DataError(f"{p}: has {len(a)} frames, but {s / 'coord.npy'} has {nf}")
            return a

        coords.append(coord.reshape(nf, natoms, 3))
        energies.append(frames("energy.npy", 1, "1 (the energy)").reshape(nf))
        forces.append(
            frames("force.npy", 3 * natoms, f"3 x {natoms} atoms (from type.raw)").reshape(nf, natoms, 3)
        )
        if not nopbc:
            box = frames("box.npy", 9, "9 (a 3 x 3 cell)").reshape(nf, 3, 3)
            vol = np.abs(np.linalg.det(box))
            if (vol < 1e-6).any():
                raise DataError(
                    f"{s / 'box.npy'}: cell of frame {int(np.argmax(vol < 1e-6))} is singular (volume ~0)"
                )
            cells.append(box)
        vir_here = (s / "virial.npy").is_file()
        if has_virial is None:
            has_virial = vir_here
        elif vir_here != has_virial:
            raise DataError(
                f"{s / 'virial.npy'}: {'present' if vir_here else 'missing'} here but "
                f"{'present' if has_virial else 'missing'} in {sets[0]}; virials must be in every set or none"
            )
        if vir_here:
            virials.append(frames("virial.npy", 9, "9 (a 3 x 3 virial)").reshape(nf, 3, 3))

    return System(
        name=str(path),
        type_map=names,
        types=types,
        coords=np.concatenate(coords),
        cells=None if nopbc else np.concatenate(cells),
        energies=np.concatenate(energies),
        forces=np.concatenate(forces),
        virials=np.concatenate(virials) if has_virial else None,
    )


def find_systems(root) -> list[Path]:
    """Every directory at or under ``root`` that holds a type.raw (a DeePMD system), sorted."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: does not exist")
    return sorted({p.parent for p in root.rglob("type.raw") if p.is_file()})


# ---------------------------------------------------------------------------------------------------------
# extended XYZ


def read_extxyz(path, type_map: list[str] | None = None) -> System:
    """Read every frame of an extended XYZ file (via ``ase.io.read(path, index=':')``) as one System.

    Each frame needs an energy and forces; a virial is taken from the ``virial`` key (3 x 3, eV) or
    converted from the stress: ASE's stress is sigma = (1/V) dE/d(eps) (eV/Angstrom^3; positive under
    tension), so the virial in the DeePMD convention is::

        Xi = -dE/d(eps) = -sigma * V        (V = |det cell|)

    Virials are kept only when every frame has one. All frames must have the same elements in the same
    order (one DeePMD system); a file mixing compositions raises DataError. ``type_map`` fixes the type
    indices; by default the elements in order of first appearance in the first frame.
    """
    import ase.io

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: missing")
    try:
        frames = ase.io.read(path, index=":", format="extxyz")
    except Exception as e:  # ASE raises many kinds of errors on a malformed file
        raise DataError(f"{path}: not readable as extended XYZ ({type(e).__name__}: {e})") from e
    if not frames:
        raise DataError(f"{path}: no frames")

    symbols = frames[0].get_chemical_symbols()
    if type_map is None:
        type_map = list(dict.fromkeys(symbols))
    type_map = list(type_map)
    missing = sorted(set(symbols) - set(type_map))
    if missing:
        raise DataError(f"{path}: elements {missing} are not in type_map {type_map}")
    types = np.array([type_map.index(s) for s in symbols], dtype=np.int64)
    pbc = frames[0].pbc.copy()

    coords, cells, energies, forces, virials = [], [], [], [], []
    for k, atoms in enumerate(frames):
        where = f"{path}: frame {k}"
        if atoms.get_chemical_symbols() != symbols:
            raise DataError(
                f"{where} has elements {atoms.get_chemical_formula()} in a different composition "
                f"or order from frame 0 ({frames[0].get_chemical_formula()}); one file is one system"
            )
        if (atoms.pbc != pbc).any():
            raise DataError(f"{where} has pbc {atoms.pbc.tolist()}, frame 0 has {pbc.tolist()}")
        results = dict(atoms.calc.results) if atoms.calc is not None else {}
        energy = results.get("energy", results.get("free_energy", atoms.info.get("energy")))
        force = results.get("forces", atoms.arrays.get("forces"))
        if energy is None:
            raise DataError(f"{where} has no energy")
        if force is None:
            raise DataError(f"{where} has no forces")
        coords.append(atoms.positions)
        cells.append(atoms.cell.array.copy())
        energies.append(float(energy))
        forces.append(np.asarray(force, dtype=np.float64).reshape(-1, 3))
        if "virial" in atoms.info:
            virials.append(np.asarray(atoms.info["virial"], dtype=np.float64).reshape(3, 3))
        elif "stress" in results:
            volume = abs(atoms.cell.volume)
            if volume < 1e-12:
                raise DataError(f"{where} has a stress but no cell volume to turn it into a virial")
            virials.append(-np.asarray(atoms.get_stress(voigt=False), dtype=np.float64) * volume)

    coords, forces = np.array(coords), np.array(forces)
    for name, a in (("positions", coords), ("energy", np.array(energies)), ("forces", forces)):
        if not np.isfinite(a).all():
            raise DataError(f"{path}: {name} contain non-finite values (NaN or inf)")
    return System(
        name=str(path),
        type_map=type_map,
        types=types,
        coords=coords,
        cells=np.array(cells) if pbc.any() else None,
        energies=np.array(energies),
        forces=forces,
        virials=np.array(virials) if len(virials) == len(frames) else None,
        pbc=pbc,
    )


def read_systems(path, type_map: list[str] | None = None) -> list[System]:
    """Read a data path: an extended XYZ file, one DeePMD system, or a directory of systems (recursively)."""
    path = Path(path)
    if path.is_file():
        return [read_extxyz(path, type_map)]
    systems = find_systems(path)
    if not systems:
        raise DataError(f"{path}: no DeePMD systems (no type.raw at or below it) and not a file")
    return [read_deepmd_system(p, type_map) for p in systems]


def system_key(name: str) -> str:
    """A machine-independent name of a system: its last two path components (e.g. 'water/data_0'), used to
    record training/validation splits in checkpoints and manifests."""
    parts = Path(name).parts
    return "/".join(parts[-2:])
