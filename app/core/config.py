"""Service settings: one pydantic-settings class, read from ``DPSERVE_*`` environment variables.

Every limit exists so that no request can make the server hang or run out of memory: a request beyond a
limit is refused with 413 (sizes) or 422 (content) before any heavy work starts; beyond the pending bounds
(before its body is read) or the queue bounds a request is shed at once with 503 and Retry-After; beyond
``request_timeout_s`` it gets 504.

Secrets (``admin_token``, ``api_keys``) are ``SecretStr``: their repr and the logs show ``**********``. Tests build their own
``Settings`` and pass it to :func:`app.main.create_app`; the running server uses :func:`get_settings`.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["Settings", "get_settings"]

_TABLE_R_MIN_FLOOR = 0.05  # A: the embedding tables are exact down to max(min_distance, this)


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
    cpu_arena: bool = Field(
        False, description="onnxruntime's CPU memory arena: keeps the largest buffers ever needed (memory climbs "
        "to the high-water mark of the biggest batch and stays); off: buffers are freed after each run")

    compression: Literal["auto", "on", "off"] = Field(
        "auto", description="se_e2_a models exported with tabulation data: serve the embedding networks as "
        "quintic tables fused with the descriptor (deepmd-kit's 'dp compress', several times faster; equal to "
        "the full graph within float32 precision). auto: on with the CPU provider, off on CUDA; on; off")
    table_stride: float = Field(0.1, gt=0, le=1, description="grid step of the embedding tables in the normalised "
                                "s(r) input (0.1 keeps the tables within 1e-8 of the networks)")

    malloc_arena_max: int = Field(
        2, ge=0, description="glibc malloc arenas (mallopt M_ARENA_MAX, set at start-up; 0: glibc's default of 8 per "
        "core). Each worker thread otherwise gets its own arena that keeps freed batch buffers: measured over 300 s "
        "of mixed load, RSS crept +74 MB/min with the default and stayed flat (-12 MB/min) with 2")

    # -- batching ----------------------------------------------------------------------------------------
    batch_wait_ms: float = Field(
        2.0, ge=0, le=1000, description="longest a request waits for batch partners (only while other "
        "requests are being decoded, so a lone client never waits)")
    max_batch_atoms: int = Field(65536, ge=1, description="atoms gathered into one model call across requests "
                                 "(a single larger request still runs, alone)")
    chunk_atoms: int = Field(8192, ge=1, description="centre atoms per onnxruntime run inside one model call "
                             "(bounds memory for huge frames; exact, the model is local)")

    model_process: Literal["auto", "on", "off"] = Field(
        "auto", description="run model calls in a child process per model, so the model and the event loop do not "
        "share a GIL (CPU provider only). auto: calls of several concurrent requests within model_process_max_atoms, "
        "the child started at the first such call; on: every call within model_process_max_atoms, the child "
        "started with the model; off: all calls in the server process. 64 clients of one 7-atom molecule each, "
        "2 cores: see docs/api.md")
    model_process_threads: int = Field(1, ge=1, description="onnxruntime and numba threads of a model's child "
                                       "process (1: it shares the machine with the event loop)")
    model_process_max: int = Field(2, ge=1, description="model child processes at most, all models together "
                                   "(each costs about 400 MB); further models' calls stay in the server process")
    model_process_max_atoms: int = Field(1024, ge=1, description="largest model call (atoms) sent to the child "
                                         "process; larger calls run in the server process's worker thread")

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

    # -- overload and deadlines --------------------------------------------------------------------------
    max_queue_requests: int = Field(
        256, ge=1, description="requests waiting for a model call, per model; beyond it a request is shed at once "
        "with 503 and Retry-After (requests of the call running now are not counted)")
    max_queue_atoms: int = Field(
        262144, ge=1, description="atoms waiting for a model call, per model (503 beyond; a request larger than "
        "this is still admitted into an empty queue, as max_atoms_per_request bounds it)")
    max_pending_requests: int = Field(
        1024, ge=1, description="/predict requests held by the server, from their arrival (before the body is "
        "read) to their response; beyond it a request is shed at once with 503 and Retry-After (a lone request is "
        "always admitted)")
    max_pending_body_bytes: int = Field(
        2**30, ge=1, description="body bytes held by those requests (declared Content-Length, or counted as the "
        "body streams in); beyond it 503 and Retry-After before the body is read, so concurrent large uploads "
        "cannot exhaust memory (a lone request is always admitted, as max_body_bytes bounds it)")
    request_timeout_s: float = Field(
        60.0, gt=0, description="deadline of one /predict request from the end of its body upload, seconds "
        "(504 beyond; frames not yet started leave the queue)")

    # -- ensembles ---------------------------------------------------------------------------------------
    ensembles: dict[str, list[str]] = Field(
        default_factory=dict, description="ensembles served under their own name: JSON {name: [member, ...]}, "
        "members 'name' or 'name/version' of models with the same type_map; /predict returns the members' "
        "mean and DP-GEN's model deviation")

    # -- access control ----------------------------------------------------------------------------------
    admin_token: SecretStr | None = Field(
        None, description="bearer token of the admin endpoints (POST /admin/reload); unset: admin endpoints "
        "are disabled (403)")
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="API keys accepted by /predict (Authorization: Bearer KEY or "
        "X-API-Key: KEY), comma-separated or a JSON list; empty: /predict is open")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="origins allowed to call the API from a browser (CORS), comma-separated "
        "or a JSON list, '*' for any; empty: no CORS headers")

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _list(cls, v):
        """A JSON list, or comma-separated values (environment variables), or a list."""
        if isinstance(v, str):
            v = v.strip()
            if v.startswith("["):
                return json.loads(v)
            return [x.strip() for x in v.split(",") if x.strip()]
        return v

    def table_options(self) -> dict:
        """Model-loading options of the compressed se_e2_a path (app.inference.compressed): the tables cover
        exactly every distance a request may hold (min_distance, floored at 0.05 A; closer atoms see the
        embedding continued linearly)."""
        return {"compression": self.compression, "table_stride": self.table_stride,
                "table_r_min": max(self.min_distance, _TABLE_R_MIN_FLOOR)}


@lru_cache
def get_settings() -> Settings:
    """The process's settings (cached; tests pass their own Settings to create_app instead)."""
    return Settings()
