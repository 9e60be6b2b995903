"""A served Deep Potential model: manifest + ONNX graph + the numpy descriptor.

The ONNX graph holds, per element t of the model's ``type_map``, one input and two outputs (names listed
in the manifest, by default ``x{t}``, ``e{t}``, ``g{t}``):

* ``x{t}``: the descriptor input of the centre atoms of element t: loc_frame (n_t, dim) flat features,
  se_e2_a (n_t, nslot, 4) environment rows. Raw (un-normalised): normalisation is inside the graph.
* ``e{t}`` (n_t,): atomic energies without the per-element bias (eV).
* ``g{t}``: dE/dx{t}, same shape as x{t}.

The per-element energy bias is added here in float64 and the total is summed in float64, so a
100k-atom total keeps meV precision even with a float32 graph. Forces and virial follow from g by the
descriptor's vector-Jacobian product (:mod:`app.physics`), so forces are exactly -dE/dr of the returned
energy up to floating point.

The physics runs on the backend chosen by ``DPSERVE_PHYSICS_BACKEND`` (:mod:`app.physics.backend`): the
numba kernels of :mod:`app.physics.kernels` by default, or the numpy reference. A model's
``physics_backend`` attribute can override it (tests compare the two).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase.data import chemical_symbols

from app.physics import backend
from app.physics.descriptors import LocFrame, make_descriptor
from app.physics.forces import accumulate_forces_virial
from app.physics.neighbors import neighbor_list
from app.physics.repulsion import PairRepulsion

__all__ = ["Frame", "DeepPotModel", "ModelLoadError", "MANIFEST_NAME", "sha256_file", "available_providers"]

log = logging.getLogger(__name__)
MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


class ModelLoadError(RuntimeError):
    """A model directory that cannot be served (the message says why)."""


@dataclass
class Frame:
    """One configuration in the model's element indices. positions (N, 3) A; cell (3, 3) rows or None."""

    types: np.ndarray
    positions: np.ndarray
    cell: np.ndarray | None = None
    pbc: np.ndarray | None = None
    blocks: np.ndarray | None = None  # isolated frames packed side by side: their atom offsets (packing)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def available_providers(device: str = "auto") -> list[str]:
    """onnxruntime providers for a device setting: 'cpu', 'cuda', or 'auto' (CUDA only when a GPU is
    visible, so CPU-only machines keep clean logs)."""
    import onnxruntime as ort

    if device == "cpu":
        return ["CPUExecutionProvider"]
    have_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if device == "cuda":
        if not have_cuda:
            raise ModelLoadError("device='cuda' but this onnxruntime has no CUDA provider")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device != "auto":
        raise ValueError(f"device must be one of 'auto', 'cpu', 'cuda', got {device!r}")
    if have_cuda and _gpu_visible():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _gpu_visible() -> bool:
    import os

    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return any(Path("/dev").glob("nvidia[0-9]*"))


class DeepPotModel:
    """Load with :meth:`load`; evaluate with :meth:`predict`."""

    def __init__(self, directory: Path, manifest: dict, session, providers: list[str]):
        self.compressed = None  # app.inference.compressed.CompressedSeA when serving tabulated embeddings
        self.load_options: dict = {}  # the options of load() but the thread count (app.inference.procworker)
        self.directory = Path(directory)
        self.manifest = manifest
        self.session = session
        self.providers = providers
        self.name: str = manifest["name"]
        self.version: str = str(manifest["version"])
        self.type_map: list[str] = list(manifest["type_map"])
        self.descriptor = make_descriptor(manifest["descriptor"], self.type_map)
        self.rcut: float = float(self.descriptor.rcut)
        self.energy_bias = np.array([manifest["energy_bias"][e] for e in self.type_map], dtype=np.float64)
        io = manifest["onnx"]
        self.input_names = [io["inputs"][e] for e in self.type_map]
        self.energy_names = [io["outputs"][e]["energy"] for e in self.type_map]
        self.grad_names = [io["outputs"][e]["grad"] for e in self.type_map]
        self.dtype = np.float32 if io.get("precision", "float32") == "float32" else np.float64
        self.physics_backend: str = backend.BACKEND
        rep = manifest.get("repulsion")
        self.repulsion = PairRepulsion(self.type_map, rep) if rep else None  # ZBL below the training range
        if self.repulsion is not None and self.repulsion.cutoff > self.rcut:
            raise ModelLoadError(f"{directory}: repulsion reaches {self.repulsion.cutoff:g} A, beyond the model's "
                                 f"cutoff {self.rcut:g} A")

    # -- loading ----------------------------------------------------------------------------------------
    @classmethod
    def load(cls, directory, device: str = "auto", intra_op_threads: int = 0, cpu_arena: bool = False,
             compression: str = "auto", table_stride: float = 0.1, table_r_min: float = 0.1) -> DeepPotModel:
        """Load and verify a model directory ``<store>/<name>/<version>/``. Raises ModelLoadError.

        ``compression`` (se_e2_a models exported with ``fitting.onnx`` + ``embedding.npz``): 'auto' serves the
        tabulated embeddings (:mod:`app.inference.compressed`) on the CPU provider with the numba physics and
        the full graph otherwise; 'on' whenever the model has them; 'off' never. The files are verified
        against their checksums whenever the manifest lists them. ``table_stride``: the tables' grid step in
        the normalised s(r); ``table_r_min``: the closest distance (A) the table covers exactly.

        ``cpu_arena``: onnxruntime's CPU memory arena keeps the largest intermediate buffers it ever needed
        and grows by doubling, so a server's memory climbs for minutes under mixed batch sizes before it
        levels off; without it, buffers go back to the allocator after each run (same speed within noise
        on the tiny test models, measured for 1 molecule, a 192-atom box and mixed batches)."""
        directory = Path(directory)
        mpath = directory / MANIFEST_NAME
        if not mpath.is_file():
            raise ModelLoadError(f"{directory}: no {MANIFEST_NAME}")
        try:
            manifest = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{mpath}: not valid JSON ({e})") from e
        _validate_manifest(manifest, mpath)
        onnx_path = _verified_file(directory, manifest["onnx"]["file"], manifest["onnx"]["sha256"], "ONNX file")
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(intra_op_threads)
        opts.enable_cpu_mem_arena = bool(cpu_arena)
        # onnxruntime caches a memory plan per distinct set of input shapes and never evicts one; ragged batches
        # give a new shape on nearly every run, so the cache grew without bound (3000 runs of random sizes on
        # water-locframe: RSS +164 MB and still climbing with it, flat at +67 MB without it).
        opts.enable_mem_pattern = False
        opts.log_severity_level = 3
        providers = available_providers(device)
        try:
            session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=providers)
        except Exception as e:  # onnxruntime raises several exception types for a bad graph
            raise ModelLoadError(f"{onnx_path}: onnxruntime cannot load it ({type(e).__name__}: {e})") from e
        names_out = {o.name for o in session.get_outputs()}
        io = manifest["onnx"]
        graph_inputs = {i.name: i.shape for i in session.get_inputs()}
        for e in manifest["type_map"]:
            if io["inputs"][e] not in graph_inputs:
                raise ModelLoadError(f"{onnx_path}: graph has no input {io['inputs'][e]!r} named by the manifest")
            for k in ("energy", "grad"):
                if io["outputs"][e][k] not in names_out:
                    raise ModelLoadError(f"{onnx_path}: graph has no output {io['outputs'][e][k]!r}")
        extra = sorted(set(graph_inputs) - {io["inputs"][e] for e in manifest["type_map"]})
        if extra:
            raise ModelLoadError(
                f"{onnx_path}: the graph has {len(graph_inputs)} element inputs but the manifest's type_map "
                f"{manifest['type_map']} names {len(manifest['type_map'])}; inputs {extra} belong to no element: "
                "the manifest is not the one of this graph")
        model = cls(directory, manifest, session, providers)
        model.load_options = {"device": device, "cpu_arena": cpu_arena, "compression": compression,
                              "table_stride": table_stride, "table_r_min": table_r_min}  # to load it again elsewhere
        if model.physics_backend == "numba":
            try:
                from app.physics import kernels

                kernels.warmup()  # compile or load the kernels now, not on the first request
            except Exception:  # a broken numba install must not take the model down: numpy serves it
                log.exception("%s: numba kernels failed to compile; serving with the numpy physics", directory)
                model.physics_backend = "numpy"
        tail = model._input_shape_tail()
        for e, name in zip(model.type_map, model.input_names, strict=True):
            shape = graph_inputs[name]
            fixed = list(shape[1:])
            if len(fixed) != len(tail) or any(isinstance(d, int) and d != t for d, t in zip(fixed, tail, strict=True)):
                raise ModelLoadError(
                    f"{onnx_path}: graph input {name!r} (element {e}) has shape {shape}, but the manifest's "
                    f"descriptor gives (n, {', '.join(map(str, tail))}): descriptor parameters and graph disagree")
        comp = manifest.get("compression")
        if comp is not None:
            if compression not in ("auto", "on", "off"):
                raise ValueError(f"compression must be one of 'auto', 'on', 'off', got {compression!r}")
            use = compression == "on" or (compression == "auto" and providers == ["CPUExecutionProvider"])
            model.compressed = _load_compressed(directory, manifest, opts, providers, use, model, table_stride, table_r_min)
        if model.compressed is not None:
            try:
                model.compressed.warmup()
            except Exception:
                log.exception("%s: compressed se_e2_a kernels failed; serving the full graph", directory)
                model.compressed = None
        return model

    def info(self) -> dict:
        m = self.manifest
        return {
            "name": self.name,
            "version": self.version,
            "descriptor": m["descriptor"]["type"],
            "type_map": self.type_map,
            "rcut": self.rcut,
            "descriptor_params": m["descriptor"],
            "precision": m["onnx"].get("precision", "float32"),
            "metrics": m.get("metrics", {}),
            "training": m.get("training", {}),
            "sha256": m["onnx"]["sha256"],
            "compressed": self.compressed.info() if self.compressed is not None else None,
            "repulsion": m.get("repulsion"),
        }

    # -- evaluation -------------------------------------------------------------------------------------
    def _inputs(self, chunk) -> np.ndarray:
        if isinstance(self.descriptor, LocFrame):
            return self.descriptor.features(chunk.env)
        return chunk.env

    def _grad_to_env(self, g: np.ndarray) -> np.ndarray:
        if isinstance(self.descriptor, LocFrame):
            return self.descriptor.features_grad_to_env(g)
        return g

    @property
    def input_dtype(self):
        """dtype of the per-element inputs: the graph's, or float64 for the (float64) compressed kernels."""
        return np.float64 if self.compressed is not None else self.dtype

    def _input_shape_tail(self) -> tuple:
        d = self.descriptor
        return (d.dim,) if isinstance(d, LocFrame) else (d.nslot, 4)

    def run_network(self, xs: list[np.ndarray], raw: bool = False) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """One onnxruntime run: per element inputs -> (atomic energies, gradients), float64 (``raw``: in the
        graph's precision, for callers that cast while copying them anyway)."""
        feeds = {}
        tail = self._input_shape_tail()
        counts = []
        for t, name in enumerate(self.input_names):
            x = xs[t] if xs[t] is not None else np.zeros((0, *tail))
            counts.append(len(x))
            if len(x) == 0:  # zero-size inputs crash some onnxruntime kernels: feed one dummy row
                x = np.zeros((1, *tail))
            feeds[name] = np.ascontiguousarray(x, dtype=self.input_dtype)
        if self.compressed is not None:
            e, g = self.compressed.run([feeds[name] for name in self.input_names], counts)
            return (e, g) if raw else ([np.asarray(x, dtype=np.float64) for x in e], g)
        outs = self.session.run(self.energy_names + self.grad_names, feeds)
        nt = len(self.type_map)
        cast = (lambda o: np.asarray(o)) if raw else (lambda o: np.asarray(o, dtype=np.float64))
        e = [cast(o).reshape(-1)[:c] for o, c in zip(outs[:nt], counts, strict=True)]
        g = [cast(o)[:c] for o, c in zip(outs[nt:], counts, strict=True)]
        return e, g

    def predict(
        self,
        frames: list[Frame],
        atomic_energies: bool = False,
        chunk_atoms: int = 8192,
        cancelled=None,
    ) -> list[dict]:
        """Energies (eV), forces (N, 3) eV/A, virials (3, 3) eV for a list of frames, in one or a few
        onnxruntime runs (frames are packed together; large frames are split into chunks of centre atoms).

        ``cancelled(k) -> bool``: checked before frame k and before each of its chunks; once true, the rest of
        frame k is skipped (its numbers are then meaningless: the caller has dropped it, e.g. a request past
        its deadline), so a huge frame nobody waits for stops within one chunk.
        """
        results = [
            {
                "atomic_energies": np.zeros(len(f.types)),
                "forces": np.zeros((len(f.types), 3)),
                "virial": np.zeros((3, 3)),
                "n_dropped": 0,
            }
            for f in frames
        ]
        pending: list[tuple[int, object, np.ndarray, np.ndarray]] = []
        pending_atoms = 0
        repulsion: list = [None] * len(frames)  # per frame: ZBL (atomic energies, forces, virial)
        fast = self.physics_backend == "numba"
        if fast:
            from app.physics import kernels
        for fi, f in enumerate(frames):
            if cancelled is not None and cancelled(fi):
                continue
            types = np.asarray(f.types, dtype=np.int64)
            if fast:
                if f.blocks is not None:  # packed isolated frames: pairs within each, no cell list
                    pairs = kernels.block_pair_list(f.positions, f.blocks, self.rcut)
                else:
                    pairs = kernels.pair_list(f.positions, f.cell, f.pbc, self.rcut)
                chunks, j_of_pair = kernels.chunks(self.descriptor, pairs, types, chunk_atoms), None
                if self.repulsion is not None:  # from the model's own pair list (its cutoff is larger)
                    centres = lambda p, s=pairs.start: np.searchsorted(s, p, side="right") - 1  # noqa: E731
                    repulsion[fi] = self.repulsion.from_pairs(types, centres, pairs.j, pairs.D)
            else:
                nl = neighbor_list(f.positions, f.cell, f.pbc, self.rcut)
                chunks, j_of_pair = self.descriptor.chunks(nl, types, chunk_atoms), nl.j
                if self.repulsion is not None:
                    repulsion[fi] = self.repulsion.from_pairs(types, nl.i, nl.j, nl.D, nl.d)
            for chunk in chunks:
                if cancelled is not None and cancelled(fi):
                    break
                pending.append((fi, chunk, types[chunk.start : chunk.stop], j_of_pair))
                pending_atoms += chunk.stop - chunk.start
                if pending_atoms >= chunk_atoms:
                    self._flush(pending, results, fast)
                    pending, pending_atoms = [], 0
        if pending:
            self._flush(pending, results, fast)
        for f, res, rep in zip(frames, results, repulsion, strict=True):
            if rep is not None:  # added last: the force assembly above overwrites, it does not accumulate
                res["atomic_energies"] += rep[0]
                res["forces"] += rep[1]
                res["virial"] += rep[2]
            res["atomic_energies"] += self.energy_bias[np.asarray(f.types, dtype=np.int64)]
            res["energy"] = float(np.sum(res["atomic_energies"], dtype=np.float64))
            if not atomic_energies:
                del res["atomic_energies"]
        return results

    def _flush(self, pending, results, fast: bool) -> None:
        """One network run for the pending chunks, then forces and virials (``fast``: numba chunks)."""
        nt = len(self.type_map)
        if fast:
            from app.physics import kernels
        xs_all = [chunk.x if fast else self._inputs(chunk) for _, chunk, _, _ in pending]
        # the rows of each chunk per element: a slice where they are contiguous (atoms listed by element)
        rows = [[_rows(ct == t) for t in range(nt)] for _, _, ct, _ in pending]
        tail = self._input_shape_tail()
        xs = []
        for t in range(nt):  # each element's input, cast to the graph's precision in the one copy made
            k = [_count(r[t]) for r in rows]
            buf = np.empty((sum(k), *tail), dtype=self.input_dtype)
            pos = 0
            for x, r, kk in zip(xs_all, rows, k, strict=True):
                buf[pos : pos + kk] = x[r[t]]
                pos += kk
            xs.append(buf)
        e, g = self.run_network(xs, raw=True)
        pos = [0] * nt
        for (fi, chunk, _, j_of_pair), x, r in zip(pending, xs_all, rows, strict=True):
            res = results[fi]
            e_chunk = res["atomic_energies"][chunk.start : chunk.stop]
            g_chunk = np.empty(x.shape)  # every row belongs to one element: all are filled below
            for t in range(nt):
                kk = _count(r[t])
                e_chunk[r[t]] = e[t][pos[t] : pos[t] + kk]
                g_chunk[r[t]] = g[t][pos[t] : pos[t] + kk]
                pos[t] += kk
            if fast:  # the VJP fused with the force and virial assembly
                res["n_dropped"] += int(chunk.n_dropped.sum())
                kernels.vjp_assemble(chunk, g_chunk, res["forces"], res["virial"])
                continue
            res["n_dropped"] += int(chunk.slots.n_dropped.sum())
            dEdr = self.descriptor.vjp(chunk, self._grad_to_env(g_chunk))
            accumulate_forces_virial(chunk.slots, chunk.start, j_of_pair, dEdr, res["forces"], res["virial"])


def _verified_file(directory: Path, name: str, sha256: str, what: str) -> Path:
    """``directory / name``, refused (ModelLoadError) when missing or when its sha256 is not the manifest's."""
    path = directory / name
    if not path.is_file():
        raise ModelLoadError(f"{directory}: {what} {name!r} named by the manifest is missing")
    digest = sha256_file(path)
    if digest != sha256:
        raise ModelLoadError(f"{path}: checksum mismatch (manifest says sha256 {sha256[:12]}..., file has "
                             f"{digest[:12]}...): refusing a model that is not the one exported")
    return path


def _load_compressed(directory: Path, manifest: dict, opts, providers, use: bool, model, stride: float, r_min: float):
    """Verify the compressed files of an se_e2_a model; build its tables when ``use``."""
    comp = manifest["compression"]
    try:
        files = {k: comp[k]["file"] for k in ("fitting", "embedding")}
        sums = {k: comp[k]["sha256"] for k in ("fitting", "embedding")}
    except (KeyError, TypeError) as e:
        raise ModelLoadError(f"{directory}: manifest 'compression' section is malformed (lacks {e})") from e
    if manifest["descriptor"]["type"] != "se_e2_a":
        raise ModelLoadError(f"{directory}: a 'compression' section is only valid for se_e2_a models")
    for k, fname in files.items():
        _verified_file(directory, fname, sums[k], f"compressed {k} file")
    if not use or model.physics_backend != "numba":
        return None
    import onnxruntime as ort

    from app.inference.compressed import CompressedSeA

    try:
        fit = ort.InferenceSession(str(directory / files["fitting"]), sess_options=opts, providers=providers)
    except Exception as e:
        raise ModelLoadError(f"{directory / files['fitting']}: onnxruntime cannot load it ({type(e).__name__}: {e})") from e
    nt = len(manifest["type_map"])
    outs = comp["fitting"].get("outputs", [])
    ins = comp["fitting"].get("inputs", [])
    if len(ins) != nt or len(outs) != nt:
        raise ModelLoadError(f"{directory}: compressed fitting graph names {len(ins)} inputs for {nt} elements")
    try:
        comp_model = CompressedSeA(directory / files["embedding"], fit, ins, [o["energy"] for o in outs],
                                   [o["grad"] for o in outs], stride=stride, r_min=r_min,
                                   rcut_smth=float(manifest["descriptor"]["rcut_smth"]), precision=model.dtype)
    except (KeyError, ValueError, OSError) as e:
        raise ModelLoadError(f"{directory / files['embedding']}: cannot read the embedding tables ({e})") from e
    if comp_model.nslot != model.descriptor.nslot or comp_model.ntypes != nt:
        raise ModelLoadError(f"{directory}: embedding.npz is for {comp_model.ntypes} elements and {comp_model.nslot} "
                             f"slots, the descriptor has {nt} and {model.descriptor.nslot}")
    log.info("%s: compressed se_e2_a, %d table bins of stride %g, largest table error %.1e (relative)",
             directory, comp_model.table.nbins, stride, comp_model.table.max_rel_error)
    return comp_model


def _rows(mask: np.ndarray) -> slice | np.ndarray:
    """The True positions of ``mask``: a slice when they are contiguous (a view, no copy), else indices."""
    idx = np.flatnonzero(mask)
    if len(idx) == 0:
        return slice(0, 0)
    if idx[-1] - idx[0] + 1 == len(idx):
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return idx


def _count(rows: slice | np.ndarray) -> int:
    return rows.stop - rows.start if isinstance(rows, slice) else len(rows)


_ELEMENTS = frozenset(chemical_symbols[1:])
_REQUIRED = {
    "format_version": int,
    "name": str,
    "version": (str, int),
    "type_map": list,
    "descriptor": dict,
    "energy_bias": dict,
    "onnx": dict,
}


def _validate_manifest(m: dict, path: Path) -> None:
    if not isinstance(m, dict):
        raise ModelLoadError(f"{path}: manifest must be a JSON object")
    for key, typ in _REQUIRED.items():
        if key not in m:
            raise ModelLoadError(f"{path}: manifest lacks required field {key!r}")
        if not isinstance(m[key], typ):
            raise ModelLoadError(f"{path}: manifest field {key!r} has the wrong type")
    if m["format_version"] != FORMAT_VERSION:
        raise ModelLoadError(f"{path}: manifest format_version {m['format_version']} is not supported (expected {FORMAT_VERSION})")
    if len(set(m["type_map"])) != len(m["type_map"]) or not m["type_map"]:
        raise ModelLoadError(f"{path}: type_map {m['type_map']} must list each element once")
    unknown = [e for e in m["type_map"] if e not in _ELEMENTS]
    if unknown:
        raise ModelLoadError(f"{path}: type_map {m['type_map']} has entries that are not element symbols: {unknown}")
    if set(m["energy_bias"]) != set(m["type_map"]):
        raise ModelLoadError(f"{path}: energy_bias is for elements {sorted(m['energy_bias'])}, but type_map is "
                             f"{m['type_map']}: the manifest contradicts itself")
    if m["descriptor"].get("type") not in ("loc_frame", "se_e2_a"):
        raise ModelLoadError(f"{path}: descriptor type must be 'loc_frame' or 'se_e2_a'")
    for e in m["type_map"]:
        if e not in m["energy_bias"]:
            raise ModelLoadError(f"{path}: energy_bias lacks element {e!r}")
        if e not in m["onnx"].get("inputs", {}) or e not in m["onnx"].get("outputs", {}):
            raise ModelLoadError(f"{path}: onnx inputs/outputs lack element {e!r}")
    for key in ("file", "sha256"):
        if key not in m["onnx"]:
            raise ModelLoadError(f"{path}: manifest onnx section lacks {key!r}")
    try:
        make_descriptor(m["descriptor"], m["type_map"])
    except (KeyError, ValueError, TypeError) as e:
        raise ModelLoadError(f"{path}: bad descriptor parameters ({e})") from e
    if m.get("repulsion") is not None:
        try:
            PairRepulsion(m["type_map"], m["repulsion"])
        except (AttributeError, KeyError, ValueError, TypeError) as e:
            raise ModelLoadError(f"{path}: bad repulsion section ({e})") from e
