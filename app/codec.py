"""Wire encodings of /predict: JSON, or msgpack for large systems (chosen by Content-Type and Accept).

Both carry the same field names. In msgpack, a numeric array may be a raw array
``{"dtype": "float64", "shape": [...], "data": <little-endian bytes>}`` (see :func:`app.schemas.raw_array`);
msgpack responses send ``forces``, ``atomic_energies`` and ``devi_f`` (the arrays that grow with N) in that form, the
small ``virial`` and ``stress`` as lists. JSON is read and written with orjson (numpy arrays serialised
directly; floats in shortest round-trip form, so both encodings give bit-identical numbers); a body that
strict JSON rejects is re-read with Python's parser, which also accepts the NaN/Infinity that Python
clients write (and the validation then names the non-finite coordinate).
"""

from __future__ import annotations

import json
import math

import msgpack
import numpy as np
import orjson

from app.core.errors import ServiceError
from app.schemas import raw_array

__all__ = ["MSGPACK", "JSON", "is_msgpack", "decode_body", "encode"]

JSON = "application/json"
MSGPACK = "application/msgpack"
_MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack")


def _media(header: str | None) -> str:
    return (header or "").split(";")[0].strip().lower()


def is_msgpack(header: str | None) -> bool:
    """Does a Content-Type, or any entry of an Accept header, name msgpack?"""
    return any(_media(part) in _MSGPACK_TYPES for part in (header or "").split(","))


def decode_body(body: bytes, content_type: str | None):
    """Parse a request body; malformed bodies raise ServiceError 400, unknown content types 415."""
    media = _media(content_type)
    if media in _MSGPACK_TYPES:
        try:
            return msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
        except Exception as e:  # msgpack raises several types (ExtraData, FormatError, ValueError, ...)
            why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            raise ServiceError(400, f"malformed msgpack body ({why})") from None
    if media in ("", JSON) or media.endswith("+json"):
        if not body:
            raise ServiceError(400, "empty request body: send a JSON object {\"frames\": [...]}")
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass  # strict JSON failed: Python's parser also reads NaN/Infinity, and says where the error is
        try:
            return json.loads(body)
        except json.JSONDecodeError as e:
            raise ServiceError(400, f"malformed JSON body: {e.msg} at line {e.lineno} column {e.colno}") from None
        except (UnicodeDecodeError, RecursionError) as e:
            raise ServiceError(400, f"malformed JSON body: {type(e).__name__}") from None
    raise ServiceError(415, f"unsupported Content-Type {media!r}; use {JSON} or {MSGPACK}")


_RAW_KEYS = ("forces", "atomic_energies", "devi_f")  # arrays that grow with N: raw arrays in msgpack


def _msgpack_value(k: str, v):
    if isinstance(v, dict):
        return {kk: _msgpack_value(kk, vv) for kk, vv in v.items()}
    if k in _RAW_KEYS:
        return raw_array(v)
    return v.tolist() if isinstance(v, np.ndarray) else v


def _msgpack_ready(results: list[dict]) -> list[dict]:
    return [{k: _msgpack_value(k, v) for k, v in r.items()} for r in results]


def encode(payload: dict, as_msgpack: bool) -> tuple[bytes, str]:
    """Encode ``{"model": {...}, "results": [{name: float | ndarray}]}``; returns (body, media type)."""
    for r in payload["results"]:
        for k, v in r.items():
            if (isinstance(v, np.ndarray) and not np.isfinite(v).all()) or (isinstance(v, float) and not math.isfinite(v)):
                raise ServiceError(500, f"the model produced a non-finite {k}: this is a bug or a broken model, please report it")
    if as_msgpack:
        body = {"model": payload["model"], "results": _msgpack_ready(payload["results"])}
        return msgpack.packb(body, use_bin_type=True), MSGPACK
    body = {"model": payload["model"], "results": payload["results"]}
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), JSON
