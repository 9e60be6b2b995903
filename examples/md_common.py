"""What the MD examples share: the water box from the DeePMD data, command-line options, an energy log.

Not a library: the examples import it from their own folder (``python examples/ase_nve_water.py``).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
from ase import Atoms, units

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing dpserve

WATER = ROOT.parent / "shared" / "data" / "water" / "data_0"


def load_water(system: Path = WATER, frame: int = 0) -> Atoms:
    """Frame ``frame`` of a DeePMD npy system (here 64 H2O, 192 atoms, cubic 12.44 A box) as ASE Atoms.

    DeePMD layout: ``type.raw`` (N,) indices into ``type_map.raw``; ``set.000/coord.npy`` (F, 3N) A;
    ``set.000/box.npy`` (F, 9) A, lattice vectors as rows.
    """
    system = Path(system)
    type_map = (system / "type_map.raw").read_text().split()
    types = np.loadtxt(system / "type.raw", dtype=int).reshape(-1)
    coord = np.load(system / "set.000" / "coord.npy", mmap_mode="r")[frame].reshape(-1, 3)  # (N, 3) A
    box = np.load(system / "set.000" / "box.npy", mmap_mode="r")[frame].reshape(3, 3)  # (3, 3) A, rows
    return Atoms([type_map[t] for t in types], positions=np.array(coord), cell=np.array(box), pbc=True)


def md_arguments(description: str, steps: int = 200) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="dpserve URL (default: %(default)s)")
    p.add_argument("--model", default=None, help="model NAME or NAME/VERSION (default: the server's)")
    p.add_argument("--encoding", default="msgpack", choices=["msgpack", "json"])
    p.add_argument("--steps", type=int, default=steps, help="MD steps (default: %(default)s)")
    p.add_argument("--dt", type=float, default=0.5, help="time step, fs (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=300.0, help="K (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1, help="random seed of the initial velocities")
    p.add_argument("--data", type=Path, default=WATER, help="DeePMD system to start from (default: %(default)s)")
    p.add_argument("--frame", type=int, default=0, help="frame of the system to start from")
    p.add_argument("--every", type=int, default=10, help="print every EVERY steps")
    p.add_argument("--log", type=Path, default=None, help="CSV file with the energies of every step")
    return p


class EnergyLog:
    """Prints and records time, potential, kinetic and total energy, and temperature, at each call."""

    def __init__(self, atoms: Atoms, dt_fs: float, every: int = 10, path: Path | None = None):
        self.atoms, self.dt_fs, self.every = atoms, dt_fs, every
        self.rows: list[tuple[float, float, float, float, float]] = []
        self.step = 0
        self.t0 = time.perf_counter()
        self._file = open(path, "w", newline="") if path else None  # closed in close()
        self._csv = csv.writer(self._file) if self._file else None
        if self._csv:
            self._csv.writerow(["time_fs", "epot_eV", "ekin_eV", "etot_eV", "temperature_K"])
        print(f"{'step':>6} {'time/fs':>9} {'Epot/eV':>14} {'Ekin/eV':>11} {'Etot/eV':>14} {'T/K':>8} {'ms/step':>8}")

    def __call__(self) -> None:
        a = self.atoms
        epot, ekin = a.get_potential_energy(), a.get_kinetic_energy()
        row = (self.step * self.dt_fs, epot, ekin, epot + ekin, a.get_temperature())
        self.rows.append(row)
        if self._csv:
            self._csv.writerow([f"{x:.10f}" for x in row])
        if self.step % self.every == 0:
            ms = 1000 * (time.perf_counter() - self.t0) / max(self.step, 1)
            print(f"{self.step:6d} {row[0]:9.2f} {epot:14.6f} {ekin:11.6f} {row[3]:14.6f} {row[4]:8.1f} {ms:8.2f}",
                  flush=True)
        self.step += 1

    def summary(self) -> None:
        """Drift of the total energy: last minus first, and the slope of a straight-line fit."""
        t, etot = np.array([r[0] for r in self.rows]), np.array([r[3] for r in self.rows])
        n = len(self.atoms)
        if len(t) > 2:
            slope = np.polyfit(t / 1000.0, etot, 1)[0]  # eV/ps
            print(f"total energy: change {1000 * (etot[-1] - etot[0]) / n:+.4f} meV/atom over {t[-1]:.1f} fs, "
                  f"fitted drift {1000 * slope / n:+.4f} meV/atom/ps, "
                  f"std {1000 * etot.std() / n:.4f} meV/atom")

    def close(self) -> None:
        if self._file:
            self._file.close()


__all__ = ["EnergyLog", "load_water", "md_arguments", "units"]
