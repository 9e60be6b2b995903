"""The server limits glibc's malloc arenas at start-up (flat memory under threaded load)."""

import platform

import pytest

from app.main import limit_malloc_arenas


def test_arena_limit_applies_on_glibc_and_is_skipped_otherwise():
    assert limit_malloc_arenas(0) is False  # 0: leave glibc's default
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("no glibc here")
    assert limit_malloc_arenas(2) is True
