"""Which implementation serves the physics hot path of :meth:`app.inference.model.DeepPotModel.predict`.

``DPSERVE_PHYSICS_BACKEND`` (read once, when this module is first imported):

* ``numba`` — the compiled kernels of :mod:`app.physics.kernels` (neighbour slots, environments, and the
  vector-Jacobian product fused with the force/virial assembly, in parallel over centre atoms);
* ``numpy`` — the numpy reference (:mod:`app.physics.environment`, :mod:`app.physics.descriptors`,
  :mod:`app.physics.forces`), which training always uses;
* unset or empty — ``numba`` when numba imports, else ``numpy``.

Both give the same numbers to rounding (``tests/physics/test_kernels.py``: 1e-12 relative). An explicit
``numba`` on a machine where the kernels cannot be imported is an error; any other value too.
"""

from __future__ import annotations

import logging
import os

__all__ = ["BACKEND", "BACKENDS", "resolve"]

log = logging.getLogger(__name__)
BACKENDS = ("numba", "numpy")


def _numba_available() -> tuple[bool, str]:
    try:
        from . import kernels  # noqa: F401  (compiles nothing: kernels compile on first use)
    except Exception as e:  # ImportError, or numba failing to set up its cache
        return False, f"{type(e).__name__}: {e}"
    return True, ""


def resolve(value: str | None) -> str:
    """The backend for a value of ``DPSERVE_PHYSICS_BACKEND`` (None or empty: the default)."""
    value = (value or "").strip().lower()
    if value and value not in BACKENDS:
        raise ValueError(f"DPSERVE_PHYSICS_BACKEND={value!r}; allowed: 'numba', 'numpy' (unset: numba if available)")
    if value == "numpy":
        return "numpy"
    ok, why = _numba_available()
    if ok:
        return "numba"
    if value == "numba":
        raise ImportError(f"DPSERVE_PHYSICS_BACKEND=numba, but the numba kernels cannot be imported ({why})")
    log.warning("numba kernels unavailable (%s): serving with the numpy physics backend", why)
    return "numpy"


BACKEND: str = resolve(os.environ.get("DPSERVE_PHYSICS_BACKEND"))
