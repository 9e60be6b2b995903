"""NVT (Langevin) molecular dynamics of 64 water molecules (192 atoms) with forces from dpserve.

    dpserve serve &
    python examples/ase_nvt_water.py --model water-se --steps 400 --temperature 300 --friction 0.01

Langevin thermostat (ASE's BAOAB-like integrator), 0.5 fs, friction 0.01/fs by default; the temperature
printed should relax to the target within a few hundred fs (1/friction = 100 fs).
"""

from __future__ import annotations

import numpy as np
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
from md_common import EnergyLog, load_water, md_arguments, units

from app.client import DPServeCalculator


def main() -> None:
    p = md_arguments(__doc__.splitlines()[0], steps=400)
    p.add_argument("--friction", type=float, default=0.01, help="Langevin friction, 1/fs (default: %(default)s)")
    args = p.parse_args()
    atoms = load_water(args.data, args.frame)
    atoms.calc = DPServeCalculator(url=args.url, model=args.model, encoding=args.encoding)
    rng = np.random.default_rng(args.seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=args.temperature, rng=rng)
    Stationary(atoms)

    dyn = Langevin(atoms, timestep=args.dt * units.fs, temperature_K=args.temperature,
                   friction=args.friction / units.fs, rng=rng)
    log = EnergyLog(atoms, args.dt, every=args.every, path=args.log)
    dyn.attach(log, interval=1)  # ASE calls it at step 0 too
    dyn.run(args.steps)
    temps = np.array([r[4] for r in log.rows])
    half = len(temps) // 2
    print(f"model: {atoms.calc.model_info}; mean temperature over the second half: {temps[half:].mean():.1f} K "
          f"(target {args.temperature:.1f} K)")
    log.close()
    atoms.calc.close()


if __name__ == "__main__":
    main()
