"""Python client of the dpserve HTTP API, and an ASE calculator on top of it.

Client-only: this module imports numpy, httpx, msgpack and ASE, never torch, fastapi or onnxruntime, so
an MD script on another machine needs none of the serving stack.

Wire contract (``POST /predict``, docs/api.md), in the project's units (design.md)::

    request   {"model": "name" | "name/version" | absent,
               "frames": [{"species": ["O", "H", ...],            element symbols (N,)
                           "positions": [[x, y, z], ...],         Angstrom (N, 3)
                           "cell": [[ax, ay, az], ...],           Angstrom (3, 3), lattice vectors as rows
                           "pbc": [true, true, true]}, ...],      absent cell: isolated system
               "properties": ["energy", "forces", "virial", "stress", "atomic_energies"]}
    response  {"model": {"name", "version"},
               "results": [{"energy": eV, "forces": eV/A (N, 3), "virial": eV (3, 3),
                            "stress": eV/A^3 (6,), "atomic_energies": eV (N,)}, ...]}

The binary encoding (``encoding="msgpack"``: Content-Type and Accept ``application/msgpack``) carries the
same fields; numeric arrays travel as ``{"dtype": "float64", "shape": [...], "data": <little-endian
bytes>}`` so that a large box is neither printed nor parsed as decimal text. Both encodings give the
same numbers: JSON floats are written with Python's shortest round-trip repr.

Outputs, as numpy arrays (one dict per frame)::

    energy           float        eV
    forces           (N, 3)       eV/A          F = -dE/dr
    virial           (3, 3)       eV            Xi = -dE/d(epsilon) at epsilon = 0 (DeePMD's virial.npy)
    stress           (6,)         eV/A^3        ASE sign and Voigt order (xx, yy, zz, yz, xz, xy), -Xi / V
    atomic_energies  (N,)         eV            sum_i E_i = energy

Failures: a 4xx answer raises :class:`DPServeError` with the status and the server's message (every
validation message names the offending field). 503 (overloaded; ``Retry-After`` is honoured), 502/504
(a proxy in front of replicas) and connection errors are retried with exponential backoff, a bounded
number of times, then raise :class:`DPServeError` too. Retrying ``/predict`` is safe: it has no side
effects.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import httpx
import msgpack
import numpy as np
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes

from app.core.units import stress_voigt  # numpy only

__all__ = [
    "PROPERTIES",
    "DEFAULT_PROPERTIES",
    "DPServeError",
    "Client",
    "AsyncClient",
    "DPServeCalculator",
]

PROPERTIES = ("energy", "forces", "virial", "stress", "atomic_energies")
DEFAULT_PROPERTIES = ("energy", "forces", "virial")  # the server's default when a request names none
ENCODINGS = ("json", "msgpack")
MSGPACK = "application/msgpack"
DEFAULT_URL = "http://127.0.0.1:8000"

# result field -> shape, with "N" the frame's atom count (how each output is checked on arrival)
_RESULT_SHAPES = {"energy": (), "forces": ("N", 3), "virial": (3, 3), "stress": (6,), "atomic_energies": ("N",)}


class DPServeError(Exception):
    """The service refused a request (``status_code`` 4xx, or 5xx after the retries), or could not be
    reached (``status_code`` None). ``message`` is the server's own text; ``detail`` its raw ``detail``
    field (a list of ``{"loc", "msg", "type"}`` for 422)."""

    def __init__(self, message: str, status_code: int | None = None, detail: Any = None):
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.detail = detail

    def __str__(self) -> str:
        return f"HTTP {self.status_code}: {self.message}" if self.status_code is not None else self.message


# --------------------------------------------------------------------------------------------------------
# frames in
# --------------------------------------------------------------------------------------------------------


def _frame(species, positions, cell=None, pbc=None) -> dict:
    """One frame in wire units, checked for shape: species (N,) str, positions (N, 3), cell (3, 3) rows or
    None, pbc (3,) bool or None. No cell means an isolated system, whatever ``pbc`` says."""
    species = [str(s) for s in species]
    positions = np.ascontiguousarray(positions, dtype=np.float64)
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise ValueError(f"positions must have shape (N, 3), got {positions.shape}")
    if len(species) != len(positions):
        raise ValueError(f"{len(species)} species for {len(positions)} positions")
    if not np.isfinite(positions).all():
        raise ValueError("positions contain NaN or infinity")
    if cell is not None:
        cell = np.ascontiguousarray(cell, dtype=np.float64)
        if cell.shape == (9,):
            cell = cell.reshape(3, 3)  # DeePMD's box.npy row
        if cell.shape != (3, 3):
            raise ValueError(f"cell must have shape (3, 3) (lattice vectors as rows), got {cell.shape}")
        if not np.isfinite(cell).all():
            raise ValueError("cell contains NaN or infinity")
        pbc = [True, True, True] if pbc is None else [bool(b) for b in np.broadcast_to(pbc, (3,))]
    else:
        pbc = None
    return {"species": species, "positions": positions, "cell": cell, "pbc": pbc}


def _frame_from_atoms(atoms) -> dict:
    """An ASE Atoms -> frame: the cell travels only if some direction is periodic."""
    pbc = np.asarray(atoms.pbc, dtype=bool)
    cell = np.asarray(atoms.cell.array) if pbc.any() else None
    return _frame(atoms.get_chemical_symbols(), atoms.positions, cell, pbc)


def _is_atoms(x) -> bool:
    return hasattr(x, "get_chemical_symbols") and hasattr(x, "positions")


def _one_frame(x) -> dict:
    if _is_atoms(x):
        return _frame_from_atoms(x)
    if isinstance(x, Mapping):
        unknown = set(x) - {"species", "positions", "cell", "pbc"}
        if unknown or "species" not in x or "positions" not in x:
            raise ValueError(
                f"a frame dict needs 'species' and 'positions' (optional 'cell', 'pbc'), got keys {sorted(x)}")
        return _frame(x["species"], x["positions"], x.get("cell"), x.get("pbc"))
    raise TypeError(f"a frame is an ase.Atoms or a dict with species/positions[/cell/pbc], not {type(x).__name__}")


def normalize_frames(frames=None, *, species=None, positions=None, cell=None, pbc=None) -> tuple[list[dict], bool]:
    """Whatever :meth:`Client.predict` accepts -> (list of frames, whether a single frame was given).

    Accepted: an ASE Atoms; a dict ``{"species", "positions"[, "cell", "pbc"]}``; a list of either; or
    the keyword arrays ``species=..., positions=...[, cell=..., pbc=...]`` for one frame.
    """
    if positions is not None or species is not None:
        if frames is not None:
            raise TypeError("give either frames or species=/positions=, not both")
        if positions is None or species is None:
            raise TypeError("species= and positions= go together")
        return [_frame(species, positions, cell, pbc)], True
    if frames is None:
        raise TypeError("nothing to predict: give frames (ase.Atoms, dicts, or a list) or species=/positions=")
    if _is_atoms(frames) or isinstance(frames, Mapping):
        return [_one_frame(frames)], True
    if isinstance(frames, Iterable) and not isinstance(frames, str | bytes):
        out = [_one_frame(f) for f in frames]
        if not out:
            raise ValueError("frames is empty")
        return out, False
    raise TypeError(f"cannot read frames from {type(frames).__name__}")


def _check_properties(properties) -> list[str] | None:
    if properties is None:
        return None
    if isinstance(properties, str):
        properties = [properties]
    props = list(dict.fromkeys(properties))
    bad = [p for p in props if p not in PROPERTIES]
    if bad:
        raise ValueError(f"unknown properties {bad}; allowed: {list(PROPERTIES)}")
    return props


# --------------------------------------------------------------------------------------------------------
# encoding
# --------------------------------------------------------------------------------------------------------


def _raw(a: np.ndarray) -> dict:
    a = np.ascontiguousarray(a, dtype="<f8")
    return {"dtype": "float64", "shape": list(a.shape), "data": a.tobytes()}


def _unraw(v) -> np.ndarray:
    """A wire array (nested lists, a number, or the raw {"dtype", "shape", "data"} form) -> float64 array."""
    if isinstance(v, Mapping) and "data" in v:
        dt = np.dtype(v.get("dtype", "float64")).newbyteorder("<")
        return np.frombuffer(v["data"], dtype=dt).reshape(v["shape"]).astype(np.float64)
    return np.asarray(v, dtype=np.float64)


def encode_request(frames: list[dict], properties, model, encoding: str) -> tuple[bytes, dict]:
    """The body and headers of a POST /predict."""
    binary = encoding == "msgpack"
    wire = []
    for f in frames:
        w = {"species": f["species"], "positions": _raw(f["positions"]) if binary else f["positions"].tolist()}
        if f["cell"] is not None:
            w["cell"] = _raw(f["cell"]) if binary else f["cell"].tolist()
            w["pbc"] = f["pbc"]
        wire.append(w)
    body: dict[str, Any] = {"frames": wire}
    if model is not None:
        body["model"] = model
    if properties is not None:
        body["properties"] = properties
    if binary:
        return msgpack.packb(body, use_bin_type=True), {"Content-Type": MSGPACK, "Accept": MSGPACK}
    return json.dumps(body, allow_nan=False).encode(), {"Content-Type": "application/json",
                                                         "Accept": "application/json"}


def _body(response: httpx.Response):
    ctype = response.headers.get("content-type", "")
    if ctype.startswith(MSGPACK):
        return msgpack.unpackb(response.content, raw=False)
    return response.json()


def decode_results(payload: Mapping, frames: list[dict]) -> tuple[list[dict], dict]:
    """The /predict answer -> (one dict of numpy arrays per frame, the {"name", "version"} of the model).
    Shapes are checked against the frames that were sent."""
    results = payload.get("results")
    if not isinstance(results, list) or len(results) != len(frames):
        raise DPServeError(f"malformed /predict answer: expected {len(frames)} results, got "
                           f"{len(results) if isinstance(results, list) else type(results).__name__}")
    out = []
    for k, (r, f) in enumerate(zip(results, frames, strict=True)):
        n = len(f["species"])
        d: dict[str, Any] = {}
        for key, value in r.items():
            if key not in _RESULT_SHAPES:
                d[key] = value  # a field this client does not know: passed through untouched
                continue
            if key == "energy":
                d[key] = float(value)
                continue
            a = _unraw(value)
            shape = tuple(n if s == "N" else s for s in _RESULT_SHAPES[key])
            if a.shape != shape:
                raise DPServeError(f"malformed /predict answer: results[{k}].{key} has shape {a.shape}, "
                                   f"expected {shape}")
            d[key] = a
        out.append(d)
    return out, dict(payload.get("model") or {})


def _error_message(response: httpx.Response) -> tuple[str, Any]:
    """(one readable line, the raw detail) from a FastAPI-style error body."""
    try:
        detail = _body(response).get("detail")
    except Exception:
        text = response.text.strip()
        return (text[:500] or response.reason_phrase or "error"), None
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if not isinstance(item, Mapping):
                parts.append(str(item))
                continue
            msg = str(item.get("msg", item))
            loc = _field_path(item.get("loc") or ())
            parts.append(msg if not loc or msg.startswith(loc) else f"{loc}: {msg}")
        return "; ".join(parts), detail
    if detail is None:
        return response.reason_phrase or "error", None
    return str(detail), detail


def _field_path(loc: Sequence) -> str:
    """('body', 'frames', 2, 'species') -> 'frames[2].species' (as app.core.errors.field_path)."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out


def _retry_after(response: httpx.Response | None) -> float | None:
    """Seconds asked by a Retry-After header (delta-seconds or an HTTP date), or None."""
    if response is None:
        return None
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# --------------------------------------------------------------------------------------------------------
# clients
# --------------------------------------------------------------------------------------------------------


class _Base:
    """What the sync and async clients share: settings, request building, answers, backoff."""

    def __init__(self, url: str | None, *, encoding: str, model: str | None, timeout: float, retries: int,
                 backoff: float, backoff_max: float, retry_statuses: Sequence[int]):
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {list(ENCODINGS)}, got {encoding!r}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.url = url.rstrip("/") if url else ""
        self.encoding = encoding
        self.model = model  # default model for predict() (None: the server's default)
        self.timeout = timeout
        self.retries = retries  # extra attempts after the first (so at most retries + 1 requests)
        self.backoff = backoff  # first wait, seconds; doubled after each failed attempt
        self.backoff_max = backoff_max  # longest wait between attempts, seconds (also caps Retry-After)
        self.retry_statuses = frozenset(retry_statuses)
        self.last_model: dict = {}  # {"name", "version"} of the model that answered the last predict()

    def _url(self, path: str) -> str:
        return self.url + path

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        """Wait before retry number ``attempt + 1``: the server's Retry-After when it gives one, else
        ``backoff * 2**attempt``; never more than ``backoff_max``."""
        ra = _retry_after(response)
        wait = ra if ra is not None else self.backoff * 2**attempt
        return min(wait, self.backoff_max)

    def _should_retry(self, attempt: int, response: httpx.Response) -> bool:
        return response.status_code in self.retry_statuses and attempt < self.retries

    def _checked(self, response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            message, detail = _error_message(response)
            raise DPServeError(message, response.status_code, detail)
        return response

    def _unreachable(self, path: str, exc: Exception) -> DPServeError:
        return DPServeError(f"cannot reach the service at {self._url(path) or path} after {self.retries + 1} "
                            f"attempts: {type(exc).__name__}: {exc}")

    def _prepare(self, frames, properties, model, species, positions, cell, pbc):
        frames_, single = normalize_frames(frames, species=species, positions=positions, cell=cell, pbc=pbc)
        props = _check_properties(properties)
        content, headers = encode_request(frames_, props, model if model is not None else self.model,
                                          self.encoding)
        return frames_, single, content, headers

    def _finish(self, response: httpx.Response, frames: list[dict], single: bool):
        results, model = decode_results(_body(response), frames)
        self.last_model = model
        return results[0] if single else results


class Client(_Base):
    """Synchronous client: one keep-alive HTTP connection reused across calls (one MD step = one POST).

    >>> with Client("http://127.0.0.1:8000") as c:           # doctest: +SKIP
    ...     r = c.predict(atoms)                              # ase.Atoms -> dict of numpy arrays
    ...     r["energy"], r["forces"].shape                    # eV, (N, 3) eV/A

    ``url`` defaults to :data:`DEFAULT_URL`. ``http_client`` injects an existing ``httpx.Client`` (for tests,
    FastAPI's ``TestClient(app)``); with it, ``url`` may be omitted (requests then go to its ``base_url``),
    and :meth:`close` leaves it open.
    """

    def __init__(self, url: str | None = None, *, encoding: str = "json",
                 model: str | None = None, timeout: float = 120.0, retries: int = 5, backoff: float = 0.1,
                 backoff_max: float = 10.0, retry_statuses: Sequence[int] = (502, 503, 504),
                 http_client: httpx.Client | None = None):
        super().__init__(url if url is not None or http_client is not None else DEFAULT_URL,
                         encoding=encoding, model=model, timeout=timeout, retries=retries, backoff=backoff,
                         backoff_max=backoff_max, retry_statuses=retry_statuses)
        self._own = http_client is None
        self._http = http_client if http_client is not None else httpx.Client(
            timeout=timeout, limits=httpx.Limits(max_connections=4, max_keepalive_connections=4))
        self._sleep = time.sleep

    def _request(self, method: str, path: str, content: bytes | None = None, headers: dict | None = None):
        for attempt in range(self.retries + 1):
            try:
                response = self._http.request(method, self._url(path), content=content, headers=headers)
            except httpx.TransportError as exc:
                if attempt == self.retries:
                    raise self._unreachable(path, exc) from exc
                self._sleep(self._delay(attempt, None))
                continue
            if self._should_retry(attempt, response):
                self._sleep(self._delay(attempt, response))
                continue
            return self._checked(response)
        raise AssertionError("unreachable")

    def predict(self, frames=None, properties: Sequence[str] | None = None, model: str | None = None, *,
                species=None, positions=None, cell=None, pbc=None):
        """Energies, forces, ... of one frame (-> one dict) or a list of frames (-> a list of dicts).

        ``frames``: an ``ase.Atoms``, a dict ``{"species", "positions"[, "cell", "pbc"]}``, or a list of
        either; or keyword arrays ``species=, positions=[, cell=, pbc=]`` for one frame. ``properties``: a
        subset of :data:`PROPERTIES` (None: the server's default, energy, forces and virial). ``model``:
        ``"name"`` or ``"name/version"`` (None: this client's ``model``, else the server's default).
        """
        frames_, single, content, headers = self._prepare(frames, properties, model, species, positions, cell, pbc)
        response = self._request("POST", "/predict", content, headers)
        return self._finish(response, frames_, single)

    def models(self) -> list[dict]:
        """The models the service has loaded (GET /models)."""
        return _body(self._request("GET", "/models"))["models"]

    def model_info(self, name: str) -> dict:
        """One model's manifest summary (GET /models/{name})."""
        return _body(self._request("GET", f"/models/{name}"))

    def health(self) -> dict:
        """Liveness (GET /health)."""
        return _body(self._request("GET", "/health"))

    def ready(self) -> bool:
        """Whether the models are loaded (GET /ready answers 200); no retries."""
        try:
            return self._http.get(self._url("/ready")).status_code == 200
        except httpx.TransportError:
            return False

    def close(self) -> None:
        if self._own:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(_Base):
    """Asynchronous client over ``httpx.AsyncClient``: the same methods as :class:`Client`, awaited.

    >>> async with AsyncClient("http://127.0.0.1:8000", encoding="msgpack") as c:   # doctest: +SKIP
    ...     results = await c.predict(list_of_atoms)
    """

    def __init__(self, url: str | None = None, *, encoding: str = "json",
                 model: str | None = None, timeout: float = 120.0, retries: int = 5, backoff: float = 0.1,
                 backoff_max: float = 10.0, retry_statuses: Sequence[int] = (502, 503, 504),
                 http_client: httpx.AsyncClient | None = None):
        super().__init__(url if url is not None or http_client is not None else DEFAULT_URL,
                         encoding=encoding, model=model, timeout=timeout, retries=retries, backoff=backoff,
                         backoff_max=backoff_max, retry_statuses=retry_statuses)
        self._own = http_client is None
        self._http = http_client if http_client is not None else httpx.AsyncClient(
            timeout=timeout, limits=httpx.Limits(max_connections=16, max_keepalive_connections=16))
        self._sleep = asyncio.sleep

    async def _request(self, method: str, path: str, content: bytes | None = None, headers: dict | None = None):
        for attempt in range(self.retries + 1):
            try:
                response = await self._http.request(method, self._url(path), content=content, headers=headers)
            except httpx.TransportError as exc:
                if attempt == self.retries:
                    raise self._unreachable(path, exc) from exc
                await self._sleep(self._delay(attempt, None))
                continue
            if self._should_retry(attempt, response):
                await self._sleep(self._delay(attempt, response))
                continue
            return self._checked(response)
        raise AssertionError("unreachable")

    async def predict(self, frames=None, properties: Sequence[str] | None = None, model: str | None = None, *,
                      species=None, positions=None, cell=None, pbc=None):
        """See :meth:`Client.predict`."""
        frames_, single, content, headers = self._prepare(frames, properties, model, species, positions, cell, pbc)
        response = await self._request("POST", "/predict", content, headers)
        return self._finish(response, frames_, single)

    async def models(self) -> list[dict]:
        return _body(await self._request("GET", "/models"))["models"]

    async def model_info(self, name: str) -> dict:
        return _body(await self._request("GET", f"/models/{name}"))

    async def health(self) -> dict:
        return _body(await self._request("GET", "/health"))

    async def ready(self) -> bool:
        try:
            return (await self._http.get(self._url("/ready"))).status_code == 200
        except httpx.TransportError:
            return False

    async def aclose(self) -> None:
        if self._own:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


# --------------------------------------------------------------------------------------------------------
# ASE calculator
# --------------------------------------------------------------------------------------------------------


class DPServeCalculator(Calculator):
    """ASE calculator whose energies and forces come from a dpserve service over HTTP.

    Outputs (ASE names and units): ``energy`` and ``free_energy`` eV (the same number: the model has no
    electronic entropy), ``forces`` (N, 3) eV/A, ``stress`` (6,) eV/A^3 for cells periodic in all three
    directions (ASE's sign and Voigt order xx, yy, zz, yz, xz, xy: stress = -virial / volume, with the virial
    Xi = -dE/d(epsilon) and stress (1/V) dE/d(epsilon), positive under tension; see app.core.units),
    ``energies`` (N,) eV per atom, whose sum is the energy (a DP model is a sum of atomic energies).

    Caching is ASE's: :meth:`calculate` runs (one POST /predict) only when the atoms changed since the last
    call or a property is asked that the last call did not fetch. Every call fetches energy and forces (an MD
    step needs both, and the server computes them together), plus the virial when the cell is 3D periodic,
    so get_potential_energy() followed by get_forces() and get_stress() costs one request. Per-atom
    energies are fetched only when asked for.

    ``client`` injects a :class:`Client` (then ``url`` and ``encoding`` are unused); otherwise one is made
    and kept for the calculator's life (one keep-alive connection for the whole trajectory).
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress", "energies"]
    default_parameters: dict = {}

    def __init__(self, url: str = DEFAULT_URL, model: str | None = None, encoding: str = "msgpack",
                 client: Client | None = None, **kwargs):
        super().__init__(**kwargs)
        self.client = client if client is not None else Client(url, encoding=encoding)
        self._own_client = client is None
        self.model = model
        self.model_info: dict = {}  # {"name", "version"} of the model that answered last
        self.requests = 0  # POSTs made (for tests and for users checking that caching works)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        a = self.atoms
        periodic3d = bool(np.all(a.pbc))
        if "stress" in properties and not periodic3d:
            raise PropertyNotImplementedError(
                f"stress needs a cell periodic in all three directions; these atoms have pbc={a.pbc.tolist()}")
        wanted = ["energy", "forces"] + (["virial"] if periodic3d else [])
        if "energies" in properties:
            wanted.append("atomic_energies")
        r = self.client.predict(a, properties=wanted, model=self.model)
        self.requests += 1
        self.model_info = self.client.last_model
        self.results["energy"] = self.results["free_energy"] = r["energy"]
        self.results["forces"] = r["forces"]
        if periodic3d:
            self.results["stress"] = stress_voigt(r["virial"], a.cell.array)
        if "atomic_energies" in r:
            self.results["energies"] = r["atomic_energies"]

    def close(self) -> None:
        if self._own_client:
            self.client.close()
