"""Ensembles: several models of the same elements served as one, with DP-GEN's model deviation.

An ensemble is configured by name (setting ``ensembles``: ``{"water-ens": ["water-se", "water-locframe/1"]}``)
and resolved against the loaded models when the registry is built (at start-up and on every reload); a
member named without a version is its highest version *then*. Members must have the same elements (the same
``type_map``, in any order); an ensemble that names a missing model, has fewer than one member, or mixes
elements is refused with a logged reason, and its members still serve on their own.

/predict on an ensemble evaluates the frames with every member (each through its own batcher, so members
batch with their other traffic) and returns the members' **mean** energy, forces, virial (stress from the
mean virial; atomic energies on request), plus the **model deviation** that DP-GEN uses to pick
configurations for DFT labelling (Zhang et al., Phys. Rev. Mater. 3, 023804 (2019); deepmd-kit
``deepmd/infer/model_devi.py``). With M members m = 1..M and <.> the mean over members:

* forces: sigma_i = sqrt( <|F_i^m - <F_i>|^2> ), per atom i (eV/Angstrom), i.e. the norm over x, y, z of the
  population standard deviation (ddof = 0) of each component; ``max_devi_f`` = max_i sigma_i,
  ``min_devi_f`` = min_i sigma_i, ``avg_devi_f`` = mean_i sigma_i, ``devi_f`` = (sigma_i), shape (N,);
* energy: ``devi_e`` = std_m(E^m / N) (eV/atom), the spread of the members' energies per atom;
* virial: s_ab = std_m(Xi_ab^m / N) (eV/atom) over the nine components; ``max_devi_v`` = max_ab s_ab,
  ``min_devi_v`` = min_ab s_ab, ``avg_devi_v`` = ||s||_2 / 3 -- deepmd-kit's ``calc_model_devi_v``.

An ensemble of one model has zero deviation. ``n_dropped`` is the largest over members.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from app.inference.model import DeepPotModel, Frame

__all__ = ["Ensemble", "resolve_ensembles", "combine", "member_frames"]

log = logging.getLogger(__name__)
VERSION = "ensemble"  # the "version" an ensemble reports in responses


@dataclass
class Ensemble:
    """Looks like a model to validation (name, type_map, rcut); ``members`` are the loaded models."""

    name: str
    members: list[DeepPotModel]
    spec: list[str] = field(default_factory=list)  # the member refs as configured
    version: str = VERSION

    @property
    def type_map(self) -> list[str]:
        return self.members[0].type_map

    @property
    def rcut(self) -> float:
        """The largest member cutoff: the density check of validation uses it (the strictest)."""
        return max(m.rcut for m in self.members)

    def member_names(self) -> list[str]:
        return [f"{m.name}/{m.version}" for m in self.members]

    def info(self) -> dict:
        return {"name": self.name, "members": self.member_names(), "configured": self.spec,
                "type_map": self.type_map, "rcut": self.rcut}


def resolve_ensembles(config: dict[str, list[str]], find, model_names: set[str]) -> tuple[list[Ensemble], list[tuple[str, str]]]:
    """Configured ensembles -> (ensembles that resolve, [(name, reason)] refused). ``find(spec)`` returns the
    loaded model of 'name' or 'name/version', or None."""
    ok, refused = [], []
    for name, specs in sorted(config.items()):
        reason = None
        members = []
        if name in model_names:
            reason = f"ensemble {name!r} has the name of a model; choose another name"
        elif "/" in name or not name:
            reason = f"ensemble name {name!r} must be non-empty and contain no '/'"
        elif not specs:
            reason = f"ensemble {name!r} has no members"
        else:
            for spec in specs:
                m = find(spec)
                if m is None:
                    reason = f"ensemble {name!r}: member {spec!r} is not loaded"
                    break
                members.append(m)
        if reason is None:
            ref = members[0]
            for m in members[1:]:
                if sorted(m.type_map) != sorted(ref.type_map):
                    reason = (f"ensemble {name!r}: members must have the same elements, but {ref.name}/{ref.version} "
                              f"has {' '.join(ref.type_map)} and {m.name}/{m.version} has {' '.join(m.type_map)}")
                    break
        if reason is not None:
            log.error("refusing %s", reason)
            refused.append((name, reason))
            continue
        ens = Ensemble(name, members, list(specs))
        log.info("ensemble %s: %s (elements %s)", name, ", ".join(ens.member_names()), " ".join(ens.type_map))
        ok.append(ens)
    return ok, refused


def member_frames(ensemble: Ensemble, member: DeepPotModel, frames: list[Frame]) -> list[Frame]:
    """Frames whose ``types`` index the ensemble's type_map -> the same frames for ``member``'s type_map."""
    if member.type_map == ensemble.type_map:
        return frames
    perm = np.array([member.type_map.index(e) for e in ensemble.type_map], dtype=np.int64)
    return [Frame(types=perm[f.types], positions=f.positions, cell=f.cell, pbc=f.pbc) for f in frames]


def combine(per_member: list[list[dict]], atomic_energies: bool, per_atom_devi: bool) -> list[dict]:
    """Members' predict() results (per member, per frame) -> per frame the mean result plus
    ``model_deviation`` (see the module docstring for the formulas)."""
    out = []
    for frame_results in zip(*per_member, strict=True):
        natoms = len(frame_results[0]["forces"])
        f = np.stack([r["forces"] for r in frame_results])  # (M, N, 3)
        e = np.array([r["energy"] for r in frame_results])  # (M,)
        v = np.stack([r["virial"] for r in frame_results])  # (M, 3, 3)
        devi_f = np.linalg.norm(np.std(f, axis=0), axis=-1)  # (N,): sqrt(<|F_i^m - <F_i>|^2>)
        devi_v = np.std(v.reshape(len(v), 9) / natoms, axis=0)  # (9,)
        dev = {
            "max_devi_f": float(devi_f.max()),
            "min_devi_f": float(devi_f.min()),
            "avg_devi_f": float(devi_f.mean()),
            "devi_e": float(np.std(e / natoms)),
            "max_devi_v": float(devi_v.max()),
            "min_devi_v": float(devi_v.min()),
            "avg_devi_v": float(np.linalg.norm(devi_v) / 3),
        }
        if per_atom_devi:
            dev["devi_f"] = devi_f
        mean = {"energy": float(e.mean()), "forces": f.mean(axis=0), "virial": v.mean(axis=0),
                "n_dropped": max(int(x["n_dropped"]) for x in frame_results), "model_deviation": dev}
        if atomic_energies:
            mean["atomic_energies"] = np.mean([x["atomic_energies"] for x in frame_results], axis=0)  # (N,)
        out.append(mean)
    return out
