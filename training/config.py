"""Training configuration: TOML file -> dataclasses, every field documented with its default.

A config file has four tables, each optional except ``[data]``::

    [descriptor]   # which descriptor and its parameters
    [network]      # layer widths
    [data]         # systems, element order, validation split
    [training]     # optimiser, schedule, loss prefactors, logging

Unknown keys and wrongly typed values are rejected with a :class:`ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Config", "ConfigError", "load_config", "config_from_dict"]


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the field."""


@dataclass
class DescriptorConfig:
    type: str = "se_e2_a"  # 'se_e2_a' (smooth DeepPot-SE) or 'loc_frame' (DeePMD 2018)
    rcut: float = 6.0  # cutoff radius, Angstrom
    rcut_smth: float = 0.5  # se_e2_a: where the switching function starts, Angstrom
    sel: list[int] = field(default_factory=lambda: [46, 92])  # se_e2_a: max neighbours per element
    sel_a: list[int] = field(default_factory=lambda: [16, 32])  # loc_frame: full-information slots per element
    sel_r: list[int] = field(default_factory=lambda: [30, 60])  # loc_frame: radial-only slots per element
    # loc_frame: per centre element, the two axis atoms as [element, rank] (rank 0 = nearest)
    axis_rule: dict[str, list] = field(default_factory=lambda: {"O": [["H", 0], ["H", 1]], "H": [["O", 0], ["H", 0]]})


@dataclass
class NetworkConfig:
    fitting: list[int] = field(default_factory=lambda: [240, 240, 240])  # fitting net hidden widths (tanh)
    embedding: list[int] = field(default_factory=lambda: [25, 50, 100])  # se_e2_a embedding widths (tanh)
    axis: int = 16  # se_e2_a: M2, columns of the embedding kept for the descriptor
    precision: str = "float32"  # training precision: 'float32' (fast) or 'float64'


@dataclass
class DataConfig:
    systems: list[str] = field(default_factory=list)  # DeePMD npy system dirs, roots holding them, or .extxyz files
    type_map: list[str] = field(default_factory=list)  # element order of the model; empty: from the first system
    val_fraction: float = 0.1  # share of each system's frames held out for validation
    max_val_frames: int = 64  # at most this many validation frames are evaluated per validation
    seed: int = 1  # seed of the split


@dataclass
class TrainingConfig:
    steps: int = 100000  # optimiser steps (the schedule runs over these, or over time_budget_min if set)
    time_budget_min: float = 0.0  # > 0: train for this many minutes of wall clock; the schedule follows time
    stop_step: int = 0  # > 0: end the run at this step, before the schedule is over (the schedule is unchanged)
    batch_frames: int = 1  # frames per step (water: 1 frame of 192 atoms; small molecules: more)
    batch_atoms: int = 0  # > 0: add frames to a batch until it holds at least this many atoms
    lr_start: float = 1.0e-3  # Adam learning rate at the start
    lr_stop: float = 3.51e-8  # learning rate at the end of the schedule (exponential decay)
    decay_steps: int = 5000  # learning rate decays in stairs of this many steps (0: continuous)
    pref_e_start: float = 0.02  # energy prefactor at the start ...
    pref_e_limit: float = 1.0  # ... and at the end (moves with lr: p = limit + (start - limit) lr/lr_start)
    pref_f_start: float = 1000.0  # force prefactor at the start
    pref_f_limit: float = 1.0  # force prefactor at the end
    pref_v_start: float = 0.0  # virial prefactor at the start (used only where the data has virials)
    pref_v_limit: float = 0.0  # virial prefactor at the end
    weight_decay: float = 0.0  # > 0: AdamW's decoupled weight decay (p -= lr * weight_decay * p each step)
    ema_decay: float = 0.0  # > 0 (e.g. 0.999): validate, plot and export an exponential moving average of the weights
    val_every: int = 1000  # steps between validations (and learning-curve rows)
    checkpoint_every: int = 5000  # steps between checkpoints
    seed: int = 0  # seed of initialisation and frame sampling
    threads: int = 0  # torch intra-op threads (0: torch's default)
    out_dir: str = "runs/model"  # where checkpoints, learning curve and plots go
    progress: bool = True  # show a progress bar


@dataclass
class Config:
    descriptor: DescriptorConfig = field(default_factory=DescriptorConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_ALLOWED = {
    "descriptor.type": ("se_e2_a", "loc_frame"),
    "network.precision": ("float32", "float64"),
}


def _coerce(section: str, cls, values: dict):
    if not isinstance(values, dict):
        raise ConfigError(f"[{section}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for key, v in values.items():
        if key not in fields:
            raise ConfigError(f"unknown field '{section}.{key}'; allowed: {', '.join(sorted(fields))}")
        default = fields[key].default if fields[key].default is not dataclasses.MISSING else fields[key].default_factory()
        name = f"{section}.{key}"
        if isinstance(default, bool):
            ok = isinstance(v, bool)
        elif isinstance(default, float):
            ok = isinstance(v, int | float) and not isinstance(v, bool)
            v = float(v) if ok else v
        elif isinstance(default, int):
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif isinstance(default, str):
            ok = isinstance(v, str)
        elif isinstance(default, list):
            ok = isinstance(v, list)
        elif isinstance(default, dict):
            ok = isinstance(v, dict)
        else:
            ok = True
        if not ok:
            raise ConfigError(f"field '{name}' must be of type {type(default).__name__}, got {v!r}")
        if name in _ALLOWED and v not in _ALLOWED[name]:
            raise ConfigError(f"field '{name}' must be one of {', '.join(_ALLOWED[name])}; got {v!r}")
        out[key] = v
    return cls(**out)


def config_from_dict(d: dict) -> Config:
    sections = {"descriptor": DescriptorConfig, "network": NetworkConfig, "data": DataConfig, "training": TrainingConfig}
    for key in d:
        if key not in sections:
            raise ConfigError(f"unknown table [{key}]; allowed: {', '.join(sections)}")
    cfg = Config(**{k: _coerce(k, cls, d.get(k, {})) for k, cls in sections.items()})
    if not cfg.data.systems:
        raise ConfigError("field 'data.systems' must list at least one data system")
    t = cfg.training
    for name in ("steps", "batch_frames", "val_every", "checkpoint_every"):
        if getattr(t, name) <= 0:
            raise ConfigError(f"field 'training.{name}' must be positive, got {getattr(t, name)}")
    if not (0 < cfg.data.val_fraction < 1):
        raise ConfigError(f"field 'data.val_fraction' must be between 0 and 1, got {cfg.data.val_fraction}")
    if not (t.lr_start > 0 and t.lr_stop > 0):
        raise ConfigError("fields 'training.lr_start' and 'training.lr_stop' must be positive")
    return cfg


def load_config(path) -> Config:
    """Read a TOML config, or a YAML one (``.yaml``/``.yml``), with the same sections and fields."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a config is a mapping of sections (descriptor, network, data, training), "
                              f"got {type(raw).__name__}")
    else:
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from e
    base = path.parent
    cfg = config_from_dict(raw)
    # relative data paths are relative to the config file
    cfg.data.systems = [str(p) if Path(p).is_absolute() else str((base / p).resolve()) for p in cfg.data.systems]
    return cfg
