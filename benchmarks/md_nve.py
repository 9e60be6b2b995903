"""NVE energy conservation of 192-atom water: `python benchmarks/md_nve.py --model model_store/water-se/1`.

Velocity Verlet (ASE), 0.5 fs steps, Maxwell-Boltzmann velocities at 300 K (zero total momentum), the
water box of ../shared/data/water/data_0 frame 0. Forces come from the model either in-process (--model DIR,
the same code path the server runs) or over HTTP (--url, through app.client.DPServeCalculator).

Reports, per model:
* drift over the first 100 fs: max |E_tot(t) - E_tot(0)| per atom (meV/atom);
* systematic drift over the whole run: slope of a least-squares line through E_tot(t) (meV/atom/ps);
* the largest jump of E_tot between consecutive steps (meV/atom): the loc_frame descriptor's
  discontinuities (neighbours crossing rcut, rank swaps, axis swaps) show up here;
* whether the run stayed physical: it stops early ("unstable_at_ps") once the temperature passes
  --max-temperature (default 2000 K) or E_tot has moved by more than 1 eV/atom, and the figures above then
  cover the run up to that point.

Writes benchmarks/results/md_nve_<name>.csv (time, total, potential, kinetic) and a PNG plot of all runs
in the same invocation, plus a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WATER = ROOT.parent / "shared" / "data" / "water" / "data_0"


def water_atoms():
    from ase import Atoms

    coord = np.load(WATER / "set.000" / "coord.npy")[0].reshape(-1, 3).astype(np.float64)
    box = np.load(WATER / "set.000" / "box.npy")[0].reshape(3, 3).astype(np.float64)
    types = np.loadtxt(WATER / "type.raw", dtype=int)
    tmap = (WATER / "type_map.raw").read_text().split()
    return Atoms([tmap[t] for t in types], positions=coord, cell=box, pbc=True)


class _Unstable(Exception):
    pass


def run(calc, steps: int, dt_fs: float, temperature: float, seed: int, log_every: int = 1,
        max_temperature: float = 2000.0):
    from ase import units
    from ase.md.velocitydistribution import Stationary, thermalize_momenta
    from ase.md.verlet import VelocityVerlet

    atoms = water_atoms()
    atoms.calc = calc
    thermalize_momenta(atoms, temperature_K=temperature, rng=np.random.default_rng(seed))
    Stationary(atoms)
    dyn = VelocityVerlet(atoms, timestep=dt_fs * units.fs)
    rows = []

    n = len(atoms)

    def record():
        ep = atoms.get_potential_energy()
        ek = atoms.get_kinetic_energy()
        rows.append((dyn.nsteps * dt_fs, ep + ek, ep, ek))
        if ek / (1.5 * n * units.kB) > max_temperature or abs(rows[-1][1] - rows[0][1]) / n > 1.0:
            raise _Unstable

    dyn.attach(record, interval=log_every)
    t0 = time.perf_counter()
    unstable_at = None
    try:
        dyn.run(steps)
    except _Unstable:
        unstable_at = rows[-1][0] / 1000.0
        rows.pop()  # the step that crossed the line is not part of the figures
    wall = time.perf_counter() - t0
    return np.array(rows), wall, unstable_at


def analyse(rows: np.ndarray, natoms: int) -> dict:
    t, etot = rows[:, 0], rows[:, 1]
    e = (etot - etot[0]) / natoms * 1000  # meV/atom
    first = t <= 100.0
    slope = np.polyfit(t / 1000.0, e, 1)[0] if len(t) > 2 else float("nan")  # meV/atom/ps
    jumps = np.abs(np.diff(e))
    return {
        "steps": int(len(t) - 1),
        "time_ps": float(t[-1] / 1000),
        "drift_first_100fs_meV_per_atom": float(np.max(np.abs(e[first]))),
        "max_abs_deviation_meV_per_atom": float(np.max(np.abs(e))),
        "slope_meV_per_atom_per_ps": float(slope),
        "max_step_jump_meV_per_atom": float(jumps.max()) if len(jumps) else 0.0,
        "mean_temperature_K": float(np.mean(rows[:, 3]) / (1.5 * natoms * 8.617333262e-5)),
    }


def plot(results: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(10, 3.6 * len(results)), squeeze=False)
    for ax, (name, (rows, summ)) in zip(axes[:, 0], results.items(), strict=True):
        t = rows[:, 0] / 1000
        n = 192
        ax.plot(t, (rows[:, 1] - rows[0, 1]) / n * 1000, label="total", lw=1.2)
        ax.plot(t, (rows[:, 2] - rows[0, 2]) / n * 1000, label="potential", lw=0.6, alpha=0.7)
        ax.plot(t, (rows[:, 3] - rows[0, 3]) / n * 1000, label="kinetic", lw=0.6, alpha=0.7)
        stop = f"; UNSTABLE at {summ['unstable_at_ps']:.2f} ps" if summ.get("unstable_at_ps") is not None else ""
        ax.set_title(
            f"{name}: NVE, 192 H2O atoms, 0.5 fs; drift {summ['slope_meV_per_atom_per_ps']:.3f} meV/atom/ps, "
            f"max step jump {summ['max_step_jump_meV_per_atom']:.3f} meV/atom{stop}",
            fontsize=9,
        )
        ax.set_xlabel("time (ps)")
        ax.set_ylabel("E - E(0) (meV/atom)")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", nargs="*", default=[], help="model directories (in-process)")
    p.add_argument("--url", default=None, help="service URL (HTTP through DPServeCalculator)")
    p.add_argument("--remote-model", nargs="*", default=[], help="model names on the service (with --url)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--dt", type=float, default=0.5, help="time step, fs")
    p.add_argument("--temperature", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-temperature", type=float, default=2000.0, help="stop (unstable) above this, K")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, summary = {}, {}
    jobs = []
    for m in args.model:
        from app.inference.calculator import DeepPotCalculator

        jobs.append((Path(m).parent.name, lambda m=m: DeepPotCalculator(m)))
    for m in args.remote_model:
        from app.client import DPServeCalculator

        jobs.append((m, lambda m=m: DPServeCalculator(url=args.url, model=m)))
    for name, make in jobs:
        rows, wall, unstable_at = run(make(), args.steps, args.dt, args.temperature, args.seed,
                                      max_temperature=args.max_temperature)
        s = analyse(rows, 192)
        s["unstable_at_ps"] = unstable_at
        s["wall_s"] = round(wall, 2)
        s["ms_per_step"] = round(1000 * wall / max(len(rows) - 1, 1), 3)
        results[name] = (rows, s)
        summary[name] = s
        np.savetxt(
            out / f"md_nve_{name}.csv", rows, delimiter=",", header="time_fs,total_eV,potential_eV,kinetic_eV"
        )
        print(name, json.dumps(s))
    if results:
        plot(results, out / "md_nve.png")
        (out / "md_nve.json").write_text(
            json.dumps({"steps": args.steps, "dt_fs": args.dt, "results": summary}, indent=2)
        )
        print(f"wrote {out / 'md_nve.json'} and {out / 'md_nve.png'}")


if __name__ == "__main__":
    main()
