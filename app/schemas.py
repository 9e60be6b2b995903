"""Request and response models of the HTTP API. Every field states its unit and shape.

Units: Angstrom, eV, eV/Angstrom, virial eV, stress eV/Angstrom^3 (see :mod:`app.core.units`).

Numeric arrays (``positions``, ``cell``) arrive as nested lists, or -- in a msgpack body -- as a *raw
array* ``{"dtype": "float64", "shape": [N, 3], "data": <N*3*8 little-endian bytes, C order>}``; both
become float64 numpy arrays here. Structure and shapes are checked here; everything that needs the model
or the physics (elements, finiteness, cell geometry, distances, density) in :mod:`app.inference.validation`.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
)

from app.core.errors import field_path

__all__ = [
    "PROPERTIES", "DEFAULT_PROPERTIES", "Property", "FrameIn", "PredictRequest", "ModelRef", "FrameResult",
    "ModelDeviation", "PredictResponse", "ModelInfo", "EnsembleInfo", "ModelsResponse", "ReloadResponse",
    "RefusedModel", "HealthResponse", "ReadyResponse",
    "ErrorResponse", "raw_array", "predict_examples", "describe_errors",
]

PROPERTIES = ("energy", "forces", "virial", "stress", "atomic_energies", "model_deviation")
DEFAULT_PROPERTIES = ("energy", "forces", "virial")
Property = Literal["energy", "forces", "virial", "stress", "atomic_energies", "model_deviation"]
RAW_DTYPES = {"float64": "<f8", "<f8": "<f8", "f8": "<f8", "float32": "<f4", "<f4": "<f4", "f4": "<f4"}


# -- raw arrays -------------------------------------------------------------------------------------------
def raw_array(a: np.ndarray) -> dict:
    """numpy array -> raw array ``{"dtype": "float64", "shape": [...], "data": bytes}`` (little-endian)."""
    a = np.ascontiguousarray(a, dtype="<f8")
    return {"dtype": "float64", "shape": list(a.shape), "data": a.tobytes()}


def _from_raw(v: dict) -> np.ndarray:
    extra = set(v) - {"dtype", "shape", "data"}
    if extra:
        raise ValueError(f"raw array has unknown keys {sorted(extra)}; allowed: dtype, shape, data")
    for k in ("dtype", "shape", "data"):
        if k not in v:
            raise ValueError(f"raw array lacks {k!r} (a raw array is {{dtype, shape, data}})")
    dtype = RAW_DTYPES.get(v["dtype"]) if isinstance(v["dtype"], str) else None
    if dtype is None:
        raise ValueError(f"raw array dtype must be 'float64' or 'float32' (little-endian), got {v['dtype']!r}")
    shape = v["shape"]
    if not (isinstance(shape, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
        raise ValueError(f"raw array shape must be a list of non-negative integers, got {shape!r}")
    data = v["data"]
    if isinstance(data, str):
        raise ValueError("raw array data must be binary (msgpack bin); raw arrays need Content-Type application/msgpack")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValueError(f"raw array data must be bytes, got {type(data).__name__}")
    itemsize = np.dtype(dtype).itemsize
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) != count * itemsize:
        raise ValueError(f"raw array data has {len(data)} bytes but shape {shape} of {v['dtype']} needs {count * itemsize}")
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(np.float64)


def _as_float_array(v: Any, what: str) -> np.ndarray:
    if isinstance(v, np.ndarray):
        a = v
    elif isinstance(v, dict):
        return _from_raw(v)
    elif isinstance(v, list):
        try:
            a = np.asarray(v)
        except (ValueError, TypeError):  # ragged nesting
            raise ValueError(f"{what}") from None
    else:
        raise ValueError(f"{what}; got {type(v).__name__}")
    if a.dtype.kind not in "iuf" or a.dtype == object:
        if a.size == 0:
            return a.astype(np.float64)
        raise ValueError(f"{what}; found non-numbers (e.g. strings, booleans or nulls)")
    return a.astype(np.float64)


def _positions(v: Any) -> np.ndarray:
    what = "positions must be a list of [x, y, z] rows (Angstrom), or a raw array of shape [N, 3]"
    a = _as_float_array(v, what)
    if a.size == 0:
        return np.zeros((0, 3))
    if a.ndim != 2 or a.shape[1] != 3:
        raise ValueError(f"{what}; got shape {list(a.shape)}")
    return np.ascontiguousarray(a)


def _cell(v: Any) -> np.ndarray | None:
    if v is None:
        return None
    what = "cell must be 3 lattice vectors as rows [[ax, ay, az], [bx, by, bz], [cx, cy, cz]] (Angstrom)"
    a = _as_float_array(v, what)
    if a.shape != (3, 3):
        raise ValueError(f"{what}; got shape {list(a.shape)}")
    return np.ascontiguousarray(a)


_RAW_SCHEMA = {
    "type": "object",
    "title": "RawArray",
    "description": "msgpack only: little-endian C-order array bytes with dtype and shape",
    "properties": {
        "dtype": {"type": "string", "enum": ["float64", "float32"]},
        "shape": {"type": "array", "items": {"type": "integer"}},
        "data": {"type": "string", "format": "binary"},
    },
    "required": ["dtype", "shape", "data"],
}
_ROW3 = {"type": "array", "items": {"type": "number"}, "minItems": 3, "maxItems": 3}

Positions = Annotated[
    Any,
    BeforeValidator(_positions),
    WithJsonSchema({"anyOf": [{"type": "array", "items": _ROW3}, _RAW_SCHEMA]}),
]
Cell = Annotated[
    Any,
    BeforeValidator(_cell),
    WithJsonSchema({"anyOf": [{"type": "array", "items": _ROW3, "minItems": 3, "maxItems": 3}, _RAW_SCHEMA, {"type": "null"}]}),
]


# -- request -----------------------------------------------------------------------------------------------
class FrameIn(BaseModel):
    """One atomic configuration."""

    model_config = ConfigDict(extra="forbid")

    species: list[str] = Field(
        description="element symbol of each atom, length N (e.g. ['O', 'H', 'H']); the model must know every "
        "element (see GET /models)")
    positions: Positions = Field(description="Cartesian positions, shape (N, 3), Angstrom; row k is atom k")
    cell: Cell = Field(
        None, description="lattice vectors as rows, shape (3, 3), Angstrom; absent or null: isolated system "
        "(molecule, cluster)")
    pbc: list[bool] | None = Field(
        None, min_length=3, max_length=3,
        description="periodicity along the three lattice vectors, shape (3,); default [true, true, true] "
        "when a cell is given, no periodicity without one")


class PredictRequest(BaseModel):
    """Frames to evaluate with one model."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None, description="model name, or 'name/version'; absent: the service's default model (GET /models)",
        examples=["water-se"])
    frames: list[FrameIn] = Field(description="configurations, evaluated independently; results come back in order")
    properties: list[Property] = Field(
        list(DEFAULT_PROPERTIES),
        description="what to compute: energy (eV), forces (N, 3) eV/A, virial (3, 3) eV, stress (6,) eV/A^3 "
        "(periodic 3D cells only), atomic_energies (N,) eV, model_deviation (ensembles only: adds the per-atom "
        "force deviation devi_f (N,) eV/A to the deviations an ensemble always reports)")

    @field_validator("frames")
    @classmethod
    def _some_frames(cls, v):
        if not v:
            raise ValueError("at least one frame is required")
        return v

    @field_validator("properties")
    @classmethod
    def _some_properties(cls, v):
        if not v:
            raise ValueError(f"ask for at least one of {', '.join(PROPERTIES)} (or leave properties out)")
        return list(dict.fromkeys(v))


_MAX_ERRORS = 20


def describe_errors(exc: ValidationError, top: type[BaseModel] | None = None) -> list[dict]:
    """pydantic errors -> FastAPI's ``[{loc, msg, type}]`` with whole-sentence messages that start with the
    field path (``frames[0].positions: ...``) and list the allowed fields or values."""
    top = top or PredictRequest
    out = []
    for err in exc.errors(include_url=False)[:_MAX_ERRORS]:
        loc = list(err["loc"])
        kind = err["type"]
        msg = err["msg"].removeprefix("Value error, ")
        if kind == "extra_forbidden":
            owner = FrameIn if (len(loc) >= 3 and loc[0] == "frames") else top
            msg = f"unknown field {loc[-1]!r}; allowed fields: {', '.join(owner.model_fields)}"
        elif kind == "missing":
            msg = "field required"
        elif kind in ("literal_error", "enum"):
            msg = f"{msg}; got {err.get('input')!r}"
        else:
            given = err.get("input")
            text = repr(given) if isinstance(given, str | int | float | bool | type(None)) else None
            if text is not None and len(text) <= 40 and kind not in ("value_error",):
                msg = f"{msg}; got {text}"
        out.append({"loc": ["body", *loc], "msg": f"{field_path(loc)}: {msg}", "type": kind})
    return out


# -- responses ---------------------------------------------------------------------------------------------
class ModelRef(BaseModel):
    name: str = Field(description="model (or ensemble) name")
    version: str = Field(description="model version; 'ensemble' for an ensemble")
    members: list[str] | None = Field(None, description="ensembles only: the member models, name/version")


class ModelDeviation(BaseModel):
    """DP-GEN's model deviation of an ensemble's members (M members, <.> the mean over members)."""

    max_devi_f: float = Field(description="max over atoms of devi_f, eV/Angstrom (DP-GEN's selection criterion)")
    min_devi_f: float = Field(description="min over atoms of devi_f, eV/Angstrom")
    avg_devi_f: float = Field(description="mean over atoms of devi_f, eV/Angstrom")
    devi_e: float = Field(description="standard deviation over members of the energy per atom, std_m(E^m / N), eV")
    max_devi_v: float = Field(description="max over the 9 components of std_m(virial^m / N), eV")
    min_devi_v: float = Field(description="min over the 9 components of std_m(virial^m / N), eV")
    avg_devi_v: float = Field(description="||std_m(virial^m / N)||_2 / 3 over the 9 components, eV")
    devi_f: list[float] | None = Field(
        None, description="per atom sigma_i = sqrt(<|F_i^m - <F_i>|^2>), shape (N,), eV/Angstrom; only when "
        "properties has model_deviation (msgpack: a raw float64 array)")


class FrameResult(BaseModel):
    """Results for one frame; only the properties asked for are present (plus n_dropped)."""

    energy: float | None = Field(None, description="total potential energy, eV")
    forces: list[list[float]] | None = Field(
        None, description="forces -dE/dr, shape (N, 3), eV/Angstrom (msgpack: a raw float64 array)")
    virial: list[list[float]] | None = Field(
        None, description="virial Xi_ab = -sum_g (dE/dh_ga) h_gb, shape (3, 3), eV (not divided by volume)")
    stress: list[float] | None = Field(
        None, description="stress -Xi/V in ASE Voigt order (xx, yy, zz, yz, xz, xy), shape (6,), eV/Angstrom^3")
    atomic_energies: list[float] | None = Field(
        None, description="per-atom energies summing to energy, shape (N,), eV (msgpack: a raw float64 array)")
    n_dropped: int = Field(
        0, description="neighbours within the cutoff that did not fit the model's sel and were ignored "
        "(non-zero means the structure is denser than the training data; ensembles: the largest over members)")
    model_deviation: ModelDeviation | None = Field(
        None, description="ensembles only: how much the members disagree (DP-GEN's model deviation); energy, "
        "forces, virial, stress and atomic_energies are then the members' mean")


class PredictResponse(BaseModel):
    model: ModelRef
    results: list[FrameResult] = Field(description="one result per frame, in request order")


class ModelInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    version: str
    descriptor: str = Field(description="descriptor kind: loc_frame or se_e2_a")
    type_map: list[str] = Field(description="elements the model knows")
    rcut: float = Field(description="cutoff radius, Angstrom")
    precision: str = Field(description="ONNX graph precision: float32 or float64")
    metrics: dict = Field(description="training/validation errors from the manifest")
    default: bool = Field(False, description="whether requests without 'model' use this model")
    versions: list[str] = Field(default_factory=list, description="all loaded versions of this name")
    providers: list[str] = Field(default_factory=list, description="onnxruntime execution providers in use, "
                                 "first = preferred (CUDAExecutionProvider on a GPU)")
    compressed: dict | None = Field(None, description="se_e2_a served with tabulated embeddings (DPSERVE_COMPRESSION): "
                                    "stride, bins, x_max, r_min_A, table_max_rel_error; null: the full graph")
    repulsion: dict | None = Field(None, description="ZBL repulsion below the training data's closest pairs: "
                                   "{type, pairs: {'A-B': [r_inner, r_outer]} in A, closest_in_training_data}; null: none")


class RefusedModel(BaseModel):
    path: str = Field(description="model directory that was not loaded, or ensembles.NAME")
    reason: str = Field(description="why (bad manifest, checksum mismatch, ...)")


class EnsembleInfo(BaseModel):
    name: str = Field(description="ensemble name, used as 'model' in /predict")
    members: list[str] = Field(description="member models, name/version")
    configured: list[str] = Field(description="the members as configured (a name without version: its highest)")
    type_map: list[str] = Field(description="elements the ensemble knows (all members know the same)")
    rcut: float = Field(description="largest member cutoff, Angstrom")


class ModelsResponse(BaseModel):
    models: list[ModelInfo]
    default_model: str | None = Field(description="name/version used when a request names no model")
    ensembles: list[EnsembleInfo] = Field(default_factory=list, description="configured ensembles that serve")
    refused: list[RefusedModel] = Field(description="model directories (and ensembles, path 'ensembles.NAME') "
                                        "refused by the last load (start-up or reload), with the reason")


class ReloadResponse(BaseModel):
    models: list[str] = Field(description="models served after the reload, name/version")
    added: list[str] = Field(description="models that were not served before")
    removed: list[str] = Field(description="models no longer served (gone from the store, or now refused)")
    replaced: list[str] = Field(description="models whose files changed and were loaded again")
    ensembles: list[str] = Field(description="ensembles served after the reload")
    refused: list[RefusedModel] = Field(description="model directories and ensembles refused, with the reason")


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    ready: bool
    models: list[str] = Field(description="loaded models, name/version")
    default_model: str | None = None
    reason: str | None = None


class ErrorResponse(BaseModel):
    detail: str | list[dict] = Field(
        description="a message (400, 401, 403, 404, 413, 415, 500, 503, 504), or for 422 a list of {loc, msg, type} whose msg "
        "names the field, e.g. 'frames[2].species[5]: unknown element ...'")


# -- OpenAPI examples ---------------------------------------------------------------------------------------
_EXAMPLES = Path(__file__).parent / "examples"


@lru_cache
def predict_examples() -> dict:
    """Examples for POST /predict in Swagger (each works when pressed, on any water model)."""
    box = json.loads((_EXAMPLES / "water_box_192.json").read_text())
    source = box.pop("_source")
    return {
        "water_molecule": {
            "summary": "one water molecule (isolated)",
            "value": {
                "frames": [{
                    "species": ["O", "H", "H"],
                    "positions": [[0.0, 0.0, 0.0], [0.7572, 0.5865, 0.0], [-0.7572, 0.5865, 0.0]],
                }],
            },
        },
        "water_box": {
            "summary": "periodic box of 64 water molecules (192 atoms), with stress",
            "description": source,
            "value": {"frames": [box], "properties": ["energy", "forces", "virial", "stress"]},
        },
    }
