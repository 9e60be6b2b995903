"""NVE molecular dynamics of 64 water molecules (192 atoms) with forces from a running dpserve service.

    dpserve serve &                                   # or: uvicorn app.main:app
    python examples/ase_nve_water.py --model water-se --steps 200 --log nve.csv

Velocity Verlet, 0.5 fs, velocities drawn from Maxwell-Boltzmann at 300 K (centre-of-mass motion removed).
Each step is one POST /predict over one keep-alive connection (DPServeCalculator); the total energy
printed should stay constant up to the integrator's O(dt^2) fluctuation if the forces are exactly -dE/dr.
"""

from __future__ import annotations

import numpy as np
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
from ase.md.verlet import VelocityVerlet
from md_common import EnergyLog, load_water, md_arguments, units

from app.client import DPServeCalculator


def main() -> None:
    args = md_arguments(__doc__.splitlines()[0]).parse_args()
    atoms = load_water(args.data, args.frame)
    atoms.calc = DPServeCalculator(url=args.url, model=args.model, encoding=args.encoding)
    MaxwellBoltzmannDistribution(atoms, temperature_K=args.temperature, rng=np.random.default_rng(args.seed))
    Stationary(atoms)

    dyn = VelocityVerlet(atoms, timestep=args.dt * units.fs)
    log = EnergyLog(atoms, args.dt, every=args.every, path=args.log)
    dyn.attach(log, interval=1)  # ASE calls it at step 0 too
    dyn.run(args.steps)
    print(f"model: {atoms.calc.model_info}, {atoms.calc.requests} requests for {args.steps} steps")
    log.summary()
    log.close()
    atoms.calc.close()


if __name__ == "__main__":
    main()
