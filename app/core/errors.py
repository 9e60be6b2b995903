"""Errors a request can cause, and their wire shape (FastAPI's, so generic clients keep working).

* 422: ``{"detail": [{"loc": ["body", "frames", 2, "species", 5], "msg": "frames[2].species[5]: ...",
  "type": "value_error"}, ...]}`` -- FastAPI's validation shape; every ``msg`` is a whole sentence that
  starts with the field path and, where there is a choice, lists the allowed values.
* any other status: ``{"detail": "message"}`` -- FastAPI's HTTPException shape.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["ServiceError", "InputError", "field_path"]


def field_path(loc: Sequence) -> str:
    """('frames', 2, 'species', 5) -> 'frames[2].species[5]' (a leading 'body' is dropped)."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "body"


class ServiceError(Exception):
    """A request the service refuses: HTTP ``status_code`` with a human-readable ``message``."""

    def __init__(self, status_code: int, message: str, loc: Sequence | None = None, type: str = "value_error",
                 errors: list[dict] | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.headers = headers  # e.g. Retry-After on 503, WWW-Authenticate on 401
        self.status_code = status_code
        self.message = message
        self.loc = tuple(loc) if loc is not None else None
        self.type = type
        self.errors = errors  # several 422 entries at once (schema validation)

    def detail(self):
        if self.errors is not None:
            return self.errors
        if self.status_code == 422:
            loc = ["body", *self.loc] if self.loc is not None else ["body"]
            return [{"loc": loc, "msg": self.message, "type": self.type}]
        return self.message


class InputError(ServiceError):
    """Content the service cannot accept, at field ``loc``; the message is prefixed with the field path."""

    def __init__(self, loc: Sequence, message: str, status_code: int = 422, type: str = "value_error"):
        super().__init__(status_code, f"{field_path(loc)}: {message}", loc=loc, type=type)
