"""Write the i-PI init file of the example: frame 0 of the water data (64 H2O, 192 atoms) as i-PI xyz.

    python examples/ipi/make_init.py                    # -> examples/ipi/water_192.xyz

The file carries the full cell (``# CELL{H}: ...``) and positions in Angstrom with 12 decimals; i-PI
reads it as its initial structure, and ``dpserve ipi --init-file`` reads the element symbols from it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # examples/: md_common (which puts the repository on the path)

from md_common import WATER, load_water  # noqa: E402

from app.ipi import write_ipi_xyz  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=WATER, help="DeePMD system (default: %(default)s)")
    p.add_argument("--frame", type=int, default=0)
    p.add_argument("--out", type=Path, default=HERE / "water_192.xyz")
    args = p.parse_args()
    atoms = load_water(args.data, args.frame)
    write_ipi_xyz(atoms, args.out)
    print(f"wrote {args.out}: {len(atoms)} atoms, cell {atoms.cell.cellpar().round(4).tolist()}")


if __name__ == "__main__":
    main()
