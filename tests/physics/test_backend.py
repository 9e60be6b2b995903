"""The physics backend switch (DPSERVE_PHYSICS_BACKEND): values, default, and the fallback to numpy."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from app.physics import backend


def test_values_and_default(monkeypatch):
    assert backend.BACKEND in backend.BACKENDS
    assert backend.resolve("numpy") == "numpy"
    with pytest.raises(ValueError, match="allowed: 'numba', 'numpy'"):
        backend.resolve("fortran")
    monkeypatch.setattr(backend, "_numba_available", lambda: (True, ""))
    assert backend.resolve("") == backend.resolve(None) == backend.resolve(" NUMBA ") == "numba"


def test_without_numba_the_default_is_numpy_and_an_explicit_numba_is_an_error(monkeypatch):
    monkeypatch.setattr(backend, "_numba_available", lambda: (False, "ImportError: no numba"))
    assert backend.resolve(None) == "numpy"
    with pytest.raises(ImportError, match="no numba"):
        backend.resolve("numba")


@pytest.mark.parametrize("value", ["numpy", "numba"])
def test_read_once_from_the_environment(value):
    if value == "numba" and importlib.util.find_spec("numba") is None:
        pytest.skip("numba is not installed")
    code = "from app.physics import backend; print(backend.BACKEND)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "DPSERVE_PHYSICS_BACKEND": value})
    assert out.stdout.strip() == value
