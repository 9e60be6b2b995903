"""The model registry: every servable model of the store, loaded at start-up and on each reload.

The store is ``<store>/<name>/<version>/`` (manifest.json + model.onnx). A directory whose manifest or
checksum does not check out (:class:`~app.inference.model.ModelLoadError`: truncated or edited ONNX file,
manifest contradicting the graph or itself), or whose manifest names another model than its path, is
refused with a logged reason; the others still serve. The store is only read.

A registry is never changed once built: a reload builds a new one (:meth:`ModelRegistry.from_store` with
``previous``), re-verifying every directory, and reuses the loaded model of each directory whose manifest
and ONNX checksum are unchanged (no second onnxruntime session, no pause for its batcher). The service
swaps the new registry in at once; requests already running finish on the old one.

Ensembles (setting ``ensembles``) are resolved against the loaded models (:mod:`app.inference.ensemble`);
a request's ``model`` may name one.

The default model (requests without ``model``) is the ``default_model`` setting if given, else
``water-se`` if loaded, else the first name in sorted order; a name without a version means its highest
version (numeric order when versions are numbers).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from app.core.errors import ServiceError
from app.inference.ensemble import Ensemble, resolve_ensembles
from app.inference.model import MANIFEST_NAME, DeepPotModel, ModelLoadError, sha256_file

__all__ = ["ModelRegistry", "Refused"]

log = logging.getLogger(__name__)
PREFERRED_DEFAULT = "water-se"


def _version_key(v: str):
    return (0, int(v), "") if v.isdigit() else (1, 0, v)


@dataclass
class Refused:
    path: str
    reason: str


@dataclass
class ModelRegistry:
    models: dict[str, dict[str, DeepPotModel]] = field(default_factory=dict)  # name -> version -> model
    refused: list[Refused] = field(default_factory=list)
    default_spec: str | None = None  # the configured default_model, if any

    ensembles: dict[str, Ensemble] = field(default_factory=dict)

    @classmethod
    def from_store(cls, store, device: str = "auto", intra_op_threads: int = 0, cpu_arena: bool = False,
                   default_model: str | None = None, ensembles: dict[str, list[str]] | None = None,
                   previous: ModelRegistry | None = None, compression: str = "auto", table_stride: float = 0.1,
                   table_r_min: float = 0.1) -> ModelRegistry:
        """Load and verify every model directory of ``store`` (reusing unchanged models of ``previous``)."""
        reg = cls(default_spec=default_model)
        store = Path(store)
        if not store.is_dir():
            log.error("model store %s does not exist (set DPSERVE_MODEL_STORE): no models loaded", store.resolve())
            return reg
        for mdir in sorted(p for p in store.glob(f"*/*/{MANIFEST_NAME}")):
            directory = mdir.parent
            name, version = directory.parent.name, directory.name
            try:
                model = _reuse(previous, directory, name, version)
                reused = model is not None
                if model is None:
                    model = DeepPotModel.load(directory, device=device, intra_op_threads=intra_op_threads,
                                              cpu_arena=cpu_arena, compression=compression,
                                              table_stride=table_stride, table_r_min=table_r_min)
                if (model.name, model.version) != (name, version):
                    raise ModelLoadError(f"{directory}: manifest says {model.name}/{model.version}, but the directory "
                                         f"is {name}/{version}: refusing an ambiguous model")
            except (ModelLoadError, KeyError, TypeError, ValueError, OSError) as e:
                reason = str(e) if isinstance(e, ModelLoadError) else f"{directory}: bad manifest ({type(e).__name__}: {e})"
                log.error("refusing model %s/%s: %s", name, version, reason)
                reg.refused.append(Refused(str(directory), reason))
                continue
            reg.models.setdefault(name, {})[version] = model
            if not reused:
                log.info("loaded model %s/%s (%s, elements %s, rcut %g A, %s) on %s", name, version,
                         model.manifest["descriptor"]["type"], " ".join(model.type_map), model.rcut,
                         model.manifest["onnx"].get("precision", "float32"), model.providers[0])
        if not reg.models:
            log.error("no servable model in %s", store.resolve())
        elif default_model is not None and reg.find(default_model) is None:
            log.error("default_model %r is not loaded; available: %s", default_model, ", ".join(reg.names()))
        found, refused = resolve_ensembles(ensembles or {}, reg.find, set(reg.models))
        reg.ensembles = {e.name: e for e in found}
        reg.refused += [Refused(f"ensembles.{name}", reason) for name, reason in refused]
        return reg

    # -- lookup ------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return [f"{n}/{v}" for n in sorted(self.models) for v in self.versions(n)]

    def versions(self, name: str) -> list[str]:
        return sorted(self.models.get(name, {}), key=_version_key)

    def all(self) -> list[DeepPotModel]:
        return [self.models[n][v] for n in sorted(self.models) for v in self.versions(n)]

    def find(self, spec: str) -> DeepPotModel | None:
        """'name' (highest version) or 'name/version' -> model, or None."""
        name, _, version = spec.partition("/")
        versions = self.models.get(name)
        if not versions:
            return None
        if not version:
            return versions[self.versions(name)[-1]]
        return versions.get(version)

    @property
    def default(self) -> DeepPotModel | None:
        if self.default_spec is not None:
            return self.find(self.default_spec)
        if not self.models:
            return None
        name = PREFERRED_DEFAULT if PREFERRED_DEFAULT in self.models else sorted(self.models)[0]
        return self.find(name)

    def get(self, spec: str | None) -> DeepPotModel | Ensemble:
        """The model (or ensemble) a request asks for, or 404 naming the available ones (503 when none is
        loaded)."""
        if not self.models:
            raise ServiceError(503, "no model is loaded (see GET /models for the refused ones and the server log)")
        if spec is not None and spec in self.ensembles:
            return self.ensembles[spec]
        model = self.default if spec is None else self.find(spec)
        if model is not None:
            return model
        available = ", ".join(self.names() + [f"{e} (ensemble)" for e in sorted(self.ensembles)])
        if spec is None:
            raise ServiceError(404, f"the default model {self.default_spec!r} is not loaded; name one of: {available}")
        raise ServiceError(404, f"model: unknown model {spec!r}; available: {available}")

    def is_default(self, model: DeepPotModel) -> bool:
        return self.default is model


def _reuse(previous: ModelRegistry | None, directory: Path, name: str, version: str) -> DeepPotModel | None:
    """The loaded model of ``directory`` in ``previous`` if its manifest and ONNX file are unchanged on disk."""
    if previous is None:
        return None
    old = previous.models.get(name, {}).get(version)
    if old is None or old.directory != directory:
        return None
    try:
        manifest = json.loads((directory / MANIFEST_NAME).read_text())
        onnx = directory / manifest["onnx"]["file"]
        if manifest != old.manifest or sha256_file(onnx) != old.manifest["onnx"]["sha256"]:
            return None
        for part in (manifest.get("compression") or {}).values():  # se_e2_a's fitting graph and embeddings
            if sha256_file(directory / part["file"]) != part["sha256"]:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # the full load reports what is wrong
    return old
