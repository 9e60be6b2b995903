"""Service settings: one pydantic-settings class, read from ``DPSERVE_*`` environment variables.

Every limit exists so that no request can make the server hang or run out of memory: a request beyond a
limit is refused with 413 (sizes) or 422 (content) before any heavy work starts. Tests build their own
``Settings`` and pass it to :func:`app.main.create_app`; the running server uses :func:`get_settings`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "get_settings"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DPSERVE_", env_file=None, extra="ignore", frozen=True)

    # -- models ------------------------------------------------------------------------------------------
    model_store: Path = Field(Path("model_store"), description="model store <name>/<version>/ (relative to the cwd)")
    default_model: str | None = Field(
        None, description="model used when a request names none ('name' or 'name/version'); unset: 'water-se' "
        "if loaded, else the first model by sorted name")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="onnxruntime device: auto (CUDA when a GPU is visible), cpu or cuda")
    intra_op_threads: int = Field(0, ge=0, description="onnxruntime intra-op threads per model (0: all cores)")

    # -- batching ----------------------------------------------------------------------------------------
    batch_wait_ms: float = Field(
        2.0, ge=0, le=1000, description="longest a request waits for batch partners (only while other "
        "requests are being decoded, so a lone client never waits)")
    max_batch_atoms: int = Field(65536, ge=1, description="atoms gathered into one model call across requests "
                                 "(a single larger request still runs, alone)")
    chunk_atoms: int = Field(8192, ge=1, description="centre atoms per onnxruntime run inside one model call "
                             "(bounds memory for huge frames; exact, the model is local)")

    # -- request limits ----------------------------------------------------------------------------------
    max_body_bytes: int = Field(128 * 2**20, ge=1, description="largest request body, bytes (413 beyond)")
    max_frames_per_request: int = Field(10_000, ge=1, description="frames in one request (413 beyond)")
    max_atoms_per_frame: int = Field(200_000, ge=1, description="atoms in one frame (413 beyond)")
    max_atoms_per_request: int = Field(200_000, ge=1, description="atoms summed over a request's frames (413 beyond)")
    max_neighbours_per_atom: int = Field(
        500, ge=1, description="mean neighbours per atom within the model's cutoff, estimated from the local "
        "density before the neighbour list is built (422 beyond; liquid water at 6 A has about 90)")
    min_distance: float = Field(0.1, ge=0, description="closest allowed approach of two atoms (or an atom and "
                                "its own periodic image), Angstrom (422 below)")
    max_abs_coordinate: float = Field(1e5, gt=0, description="largest |coordinate| or |cell entry|, Angstrom (422 beyond)")


@lru_cache
def get_settings() -> Settings:
    """The process's settings (cached; tests pass their own Settings to create_app instead)."""
    return Settings()
