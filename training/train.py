"""The training loop: `dpserve train CONFIG`.

Loss (deepmd-kit's, per frame of N atoms, averaged over the batch)::

    L = p_e dE^2 / N  +  p_f / (3N) sum_i |dF_i|^2  +  p_v / 9 |dXi|^2     (virial term only with virial labels)

Each prefactor moves from its start to its limit value as the learning rate decays:
p(t) = p_limit + (p_start - p_limit) lr(t) / lr_start. The learning rate decays exponentially from
lr_start to lr_stop over the schedule in stairs of decay_steps steps (deepmd-kit's schedule), the schedule being
steps or, with time_budget_min, wall-clock time (so a fixed time budget always ends with a fully decayed rate).
With a time budget the number of stairs is fixed after the first 200 steps from the measured step rate
(expected steps in the budget // decay_steps), so a short budget keeps deepmd-kit's long first stair at lr_start.

Writes to out_dir: checkpoint.pt (with its config; resumable), lcurve.csv, lcurve.png, parity.png.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from training.config import Config
from training.data import system_key
from training.dataset import collate, descriptor_from_config, forward, load_systems, prepare_system_frames
from training.model import build_network

__all__ = ["Trainer", "train"]


def split_frames(systems, val_fraction: float, seed: int):
    """Per system: (train frame indices, validation frame indices), a fixed random split."""
    rng = np.random.default_rng(seed)
    out = []
    for s in systems:
        perm = rng.permutation(s.nframes)
        nval = max(1, int(round(val_fraction * s.nframes))) if s.nframes > 1 else 0
        out.append((np.sort(perm[nval:]), np.sort(perm[:nval])))
    return out


def _stairs(total_steps: int, decay_steps: int) -> float:
    """Stairs of the learning-rate schedule over ``total_steps``, S = total / decay_steps (not rounded: the
    exponent at step s is floor(s / decay_steps) / S, deepmd-kit's LearningRateExp, so a run of 1.4 stairs
    drops once, at 1/1.4 of the way). As deepmd-kit, a decay_steps not below the total is replaced by 100
    (or total // 100 + 1 for short runs), so a short run still decays instead of keeping lr_start to the end."""
    if decay_steps >= total_steps:
        decay_steps = 100 if total_steps // 10 > 100 else total_steps // 100 + 1
    return max(1.0, total_steps / decay_steps)


class _BatchModel(torch.nn.Module):
    """The network applied to a whole batch (energies, forces, virials): what DDP wraps."""

    def __init__(self, net, ntypes: int):
        super().__init__()
        self.net = net
        self.ntypes = ntypes

    def forward(self, b, need_virial: bool = True):
        return forward(self.net, b, self.ntypes, need_virial=need_virial)


class Trainer:
    def __init__(self, cfg: Config, resume: str | None = None, log=print):
        self.cfg = cfg
        tc = cfg.training
        if tc.threads:
            torch.set_num_threads(tc.threads)
        torch.manual_seed(tc.seed)
        # torchrun sets WORLD_SIZE/RANK: DistributedDataParallel, gloo on CPU, nccl on GPU
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        if self.rank != 0:
            log = lambda *a, **k: None  # noqa: E731  only rank 0 talks
        self.log = log
        self.dtype = torch.float32 if cfg.network.precision == "float32" else torch.float64
        self.out = Path(tc.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)

        t0 = time.perf_counter()
        self.systems, self.type_map = load_systems(cfg.data.systems, cfg.data.type_map or None)
        self.ntypes = len(self.type_map)
        self.desc_params, self.desc = descriptor_from_config(cfg.descriptor, self.type_map)
        self.split = split_frames(self.systems, cfg.data.val_fraction, cfg.data.seed)
        self.energy_bias = self._bias()
        self.train_frames, self.val_frames = [], []
        for s, (tr, va) in zip(self.systems, self.split, strict=True):
            self.train_frames += prepare_system_frames(self.desc, s, tr, self.energy_bias)
            self.val_frames += prepare_system_frames(self.desc, s, va, self.energy_bias)
        rng = np.random.default_rng(cfg.data.seed + 1)
        if len(self.val_frames) > cfg.data.max_val_frames:
            keep = np.sort(rng.choice(len(self.val_frames), cfg.data.max_val_frames, replace=False))
            self.val_frames = [self.val_frames[k] for k in keep]
        self.has_virial = all(f["virial"] is not None for f in self.train_frames)
        dropped = sum(f["n_dropped"] for f in self.train_frames)
        if dropped:
            log(f"warning: {dropped} neighbours beyond sel were dropped while preparing the training frames")
        log(
            f"data: {len(self.systems)} systems, {len(self.train_frames)} training / {len(self.val_frames)} validation "
            f"frames, type_map {self.type_map}, prepared in {time.perf_counter() - t0:.1f} s"
        )

        net_params = dict(fitting=cfg.network.fitting, embedding=cfg.network.embedding, axis=cfg.network.axis)
        if cfg.descriptor.type == "loc_frame":
            net_params["dim"] = self.desc.dim
        else:
            net_params["sel"] = list(cfg.descriptor.sel)
        self.net_params = net_params
        self.net = build_network(cfg.descriptor.type, self.ntypes, net_params, dtype=self.dtype)
        self._set_statistics()
        self.model = _BatchModel(self.net, self.ntypes)
        if self.world > 1:
            # some element's fitting net may get no gradient in a batch without that element
            self.model = DDP(self.model, find_unused_parameters=True)
        if tc.weight_decay > 0:
            self.opt = torch.optim.AdamW(self.net.parameters(), lr=tc.lr_start, weight_decay=tc.weight_decay)
        else:
            self.opt = torch.optim.Adam(self.net.parameters(), lr=tc.lr_start)
        # exponential moving average of the weights (ema_decay > 0): what validation, plots and export see
        self.ema = [p.detach().clone() for p in self.net.parameters()] if tc.ema_decay > 0 else None
        self.step = 0
        self.elapsed = 0.0
        self.nstairs: int | None = None  # time-budget schedule: stairs, fixed from the step rate (see lr)
        self.rows: list[dict] = []
        if resume:
            self._load(resume)
        self.val_batches = [collate([f], self.ntypes, self.dtype) for f in self.val_frames]
        self.rng = np.random.default_rng(tc.seed + 7 + self.step + 1000 * self.rank)

    # -- statistics ---------------------------------------------------------------------------------------
    def _bias(self):
        """Per-element energy bias by least squares over the training frames (minimum-norm when every frame
        has the same composition, as deepmd-kit does)."""
        A, y = [], []
        for s, (tr, _) in zip(self.systems, self.split, strict=True):
            counts = np.bincount(s.types, minlength=self.ntypes).astype(np.float64)
            A.append(np.repeat(counts[None], len(tr), axis=0))
            y.append(s.energies[tr])
        return np.linalg.lstsq(np.concatenate(A), np.concatenate(y), rcond=None)[0]

    def _set_statistics(self):
        frames = self.train_frames[:: max(1, len(self.train_frames) // 200)]
        types = np.concatenate([f["types"] for f in frames])
        x = np.concatenate([f["x"] for f in frames])
        with torch.no_grad():
            if self.cfg.descriptor.type == "loc_frame":
                for t in range(self.ntypes):
                    xt = x[types == t]
                    if len(xt):
                        mean, std = xt.mean(0), xt.std(0)
                        # deepmd-kit-style protection: a rarely filled column must not be blown up by a tiny std
                        std = np.where(std < 1e-4, 1.0, np.maximum(std, 1e-2))
                        self.net.mean[t] = torch.as_tensor(mean)
                        self.net.std[t] = torch.as_tensor(std)
            else:
                sel = np.asarray(self.cfg.descriptor.sel)
                bounds = np.concatenate([[0], np.cumsum(sel)])
                for t in range(self.ntypes):
                    xt = x[types == t]  # (n, nslot, 4)
                    if not len(xt):
                        continue
                    for tt in range(self.ntypes):
                        blk = xt[:, bounds[tt] : bounds[tt + 1]]
                        filled = blk[..., 0] != 0
                        if filled.sum() < 2:
                            continue
                        std_s = np.sqrt(np.mean(blk[..., 0][filled] ** 2))
                        std_r = np.sqrt(np.mean(blk[..., 1:][filled] ** 2))
                        self.net.std[t, bounds[tt] : bounds[tt + 1], 0] = float(std_s)
                        self.net.std[t, bounds[tt] : bounds[tt + 1], 1:] = float(std_r)

    # -- schedule -----------------------------------------------------------------------------------------
    def progress(self) -> float:
        tc = self.cfg.training
        if tc.time_budget_min > 0:
            return min(1.0, self.elapsed / (60 * tc.time_budget_min))
        return min(1.0, self.step / tc.steps)

    def lr(self) -> float:
        tc = self.cfg.training
        frac = self.progress()
        if tc.decay_steps:
            if tc.time_budget_min <= 0:
                nstairs = _stairs(tc.steps, tc.decay_steps)
            else:
                if self.nstairs is None and self.step >= 200 and frac > 0:
                    self.nstairs = _stairs(int(self.step / frac), tc.decay_steps)
                nstairs = self.nstairs
            frac = math.floor(frac * nstairs) / nstairs if nstairs else 0.0
        return tc.lr_start * (tc.lr_stop / tc.lr_start) ** frac

    def prefactors(self, lr: float):
        tc = self.cfg.training
        r = lr / tc.lr_start
        pe = tc.pref_e_limit + (tc.pref_e_start - tc.pref_e_limit) * r
        pf = tc.pref_f_limit + (tc.pref_f_start - tc.pref_f_limit) * r
        pv = tc.pref_v_limit + (tc.pref_v_start - tc.pref_v_limit) * r
        return pe, pf, pv

    # -- steps --------------------------------------------------------------------------------------------
    def sample_batch(self):
        tc = self.cfg.training
        picks = []
        atoms = 0
        while len(picks) < tc.batch_frames or (tc.batch_atoms and atoms < tc.batch_atoms):
            k = int(self.rng.integers(len(self.train_frames)))
            picks.append(self.train_frames[k])
            atoms += len(picks[-1]["types"])
        return collate(picks, self.ntypes, self.dtype)

    def loss(self, b, pe, pf, pv):
        energy, forces, virial = self.model(b, need_virial=pv > 0 and b.has_virial)
        n = torch.as_tensor(b.natoms, dtype=torch.float64)
        de = energy - b.energy
        le = torch.mean(de**2 / n)
        df2 = ((forces - b.forces) ** 2).sum(-1)
        frame_of_atom = torch.repeat_interleave(torch.arange(b.nframes), torch.as_tensor(b.natoms))
        lf_frame = torch.zeros(b.nframes, dtype=df2.dtype).index_add(0, frame_of_atom, df2) / (3 * n.to(df2.dtype))
        lf = lf_frame.mean()
        loss = pe * le + pf * lf
        lv = None
        if virial is not None:
            lv = torch.mean(((virial - b.virial) ** 2).sum((-1, -2)) / 9)
            loss = loss + pv * lv
        return loss, dict(le=le.item(), lf=lf.item(), lv=lv.item() if lv is not None else float("nan"))

    @contextlib.contextmanager
    def averaged_weights(self):
        """Within the block the network holds the EMA weights (if any); the training weights come back after."""
        if self.ema is None:
            yield
            return
        params = list(self.net.parameters())
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, e in zip(params, self.ema, strict=True):
                p.copy_(e)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved, strict=True):
                    p.copy_(s)

    def validate(self) -> dict:
        se_e, se_f, se_v, n_f = [], 0.0, [], 0
        with torch.no_grad(), self.averaged_weights():
            for b in self.val_batches:
                energy, forces, virial = forward(self.net, b, self.ntypes, need_virial=b.has_virial)
                se_e.append(float(((energy - b.energy) / torch.as_tensor(b.natoms)).pow(2).sum()))
                se_f += float(((forces - b.forces) ** 2).sum())
                n_f += forces.numel()
                if virial is not None:
                    se_v.append(float((((virial - b.virial) / float(b.natoms[0])) ** 2).mean()))
        return dict(
            rmse_e_val=math.sqrt(sum(se_e) / max(len(se_e), 1)),
            rmse_f_val=math.sqrt(se_f / max(n_f, 1)),
            rmse_v_val=math.sqrt(np.mean(se_v)) if se_v else float("nan"),
        )

    def run(self):
        tc = self.cfg.training
        total = tc.steps if tc.time_budget_min <= 0 else None
        bar = None
        if tc.progress and self.rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=total if total else int(60 * tc.time_budget_min), initial=self.step if total else int(self.elapsed),
                       unit="step" if total else "s", dynamic_ncols=True, mininterval=1.0)
        # ranks of a DDP run must stop at the same step: there torchrun's signal handling stays as it is
        with _GracefulStop(install=self.world == 1) as signalled:
            self._loop(bar, signalled)
        if bar is not None:
            bar.close()
        if self.world > 1:
            self._check_ranks_agree()
        if self.rank == 0:
            self.save()
            self.plot()
        if signalled.name:
            self.log(f"{signalled.name}: stopped at step {self.step} ({self.elapsed / 60:.1f} min trained); "
                     f"checkpoint and plots written; continue with --resume {self.out / 'checkpoint.pt'}")
        if self.world > 1:
            dist.barrier()
        return self.rows[-1] if self.rows else {}

    def finished(self) -> bool:
        """The schedule is over, or the run reached ``stop_step``."""
        tc = self.cfg.training
        return self.progress() >= 1.0 or (tc.stop_step > 0 and self.step >= tc.stop_step)

    def _loop(self, bar, signalled) -> None:
        tc = self.cfg.training
        last = time.perf_counter()
        acc = dict(loss=0.0, le=0.0, lf=0.0, n=0)
        while not (self.finished() or signalled.name):
            lr = self.lr()
            for g in self.opt.param_groups:
                g["lr"] = lr
            pe, pf, pv = self.prefactors(lr)
            b = self.sample_batch()
            loss, parts = self.loss(b, pe, pf, pv)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            if self.ema is not None:
                with torch.no_grad():
                    d = tc.ema_decay
                    for e, p in zip(self.ema, self.net.parameters(), strict=True):
                        e.mul_(d).add_(p.detach(), alpha=1.0 - d)
            self.step += 1
            now = time.perf_counter()
            self.elapsed += now - last
            if self.world > 1:  # one clock for all ranks: rank 0's, so the schedule stays in step
                t = torch.tensor([self.elapsed], dtype=torch.float64)
                dist.broadcast(t, 0)
                self.elapsed = float(t)
            if bar is not None:
                bar.update(1 if tc.time_budget_min <= 0 else int(self.elapsed) - bar.n)
            last = now
            acc["loss"] += loss.item()
            acc["le"] += parts["le"]
            acc["lf"] += parts["lf"]
            acc["n"] += 1
            if self.rank == 0 and (self.step % tc.val_every == 0 or self.finished() or signalled.name):
                row = dict(step=self.step, elapsed_s=round(self.elapsed, 2), lr=lr, loss=acc["loss"] / acc["n"],
                           rmse_e_trn=math.sqrt(acc["le"] / acc["n"] / float(np.mean(b.natoms))) if acc["n"] else float("nan"),
                           rmse_f_trn=math.sqrt(acc["lf"] / acc["n"]))
                row.update(self.validate())
                self.rows.append(row)
                self._write_lcurve()
                acc = dict(loss=0.0, le=0.0, lf=0.0, n=0)
                if bar is not None:
                    bar.set_postfix(step=self.step, loss=f"{row['loss']:.3g}", e_val=f"{row['rmse_e_val'] * 1000:.2f}meV/at",
                                    f_val=f"{row['rmse_f_val']:.3f}eV/A", lr=f"{lr:.1e}")
                else:
                    self.log(json.dumps(row))
                last = time.perf_counter()  # validation time is not training time
            if self.rank == 0 and self.step % tc.checkpoint_every == 0:
                self.save()

    def _check_ranks_agree(self):
        """All ranks must hold identical weights after DDP training; recorded in ddp_check.json."""
        flat = torch.cat([p.detach().reshape(-1).to(torch.float64) for p in self.net.parameters()])
        mine = torch.tensor([float(flat.sum()), float((flat * flat).sum()), float(flat.abs().max())], dtype=torch.float64)
        allv = [torch.zeros_like(mine) for _ in range(self.world)]
        dist.all_gather(allv, mine)
        same = all(torch.equal(allv[0], v) for v in allv[1:])
        if self.rank == 0:
            (self.out / "ddp_check.json").write_text(json.dumps({"world_size": self.world, "step": self.step,
                                                                  "identical_weights": same,
                                                                  "fingerprints": [v.tolist() for v in allv]}))
            self.log(f"DDP: {self.world} ranks, identical weights after {self.step} steps: {same}")

    # -- persistence --------------------------------------------------------------------------------------
    def state(self) -> dict:
        return dict(
            config=self.cfg.to_dict(),
            type_map=self.type_map,
            descriptor=self.desc_params,
            network=self.net_params,
            net_state=self._export_state(),  # the weights to export: the EMA ones when averaging
            train_state=self.net.state_dict(),  # the optimiser's weights, to resume from
            opt_state=self.opt.state_dict(),
            energy_bias=self.energy_bias.tolist(),
            step=self.step,
            elapsed=self.elapsed,
            nstairs=self.nstairs,
            rows=self.rows,
            split={system_key(s.name): [tr.tolist(), va.tolist()] for s, (tr, va) in zip(self.systems, self.split, strict=True)},
        )

    def save(self, path: Path | None = None):
        path = path or self.out / "checkpoint.pt"
        tmp = path.with_suffix(".tmp")
        torch.save(self.state(), tmp)
        os.replace(tmp, path)

    def _load(self, path):
        st = torch.load(path, map_location="cpu", weights_only=False)
        self.net.load_state_dict(st.get("train_state", st["net_state"]))
        if self.ema is not None:
            ema = st["net_state"] if "train_state" in st else self.net.state_dict()
            named = dict(self.net.named_parameters())
            self.ema = [ema[k].detach().clone() for k in named]
        self.opt.load_state_dict(st["opt_state"])
        self.energy_bias = np.asarray(st["energy_bias"])
        self.step, self.elapsed, self.rows = st["step"], st["elapsed"], st["rows"]
        self.nstairs = st.get("nstairs")
        self.log(f"resumed from {path} at step {self.step} ({self.elapsed / 60:.1f} min trained)")

    def _export_state(self) -> dict:
        with self.averaged_weights():
            return {k: v.detach().clone() for k, v in self.net.state_dict().items()}

    def _write_lcurve(self):
        with open(self.out / "lcurve.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(self.rows[0]))
            w.writeheader()
            w.writerows(self.rows)

    def plot(self):
        from training.plots import plot_lcurve, plot_parity

        if self.rows:
            plot_lcurve(self.rows, self.out / "lcurve.png", title=f"{self.cfg.descriptor.type} learning curve")
        e_ref, e_pred, f_ref, f_pred = [], [], [], []
        with torch.no_grad(), self.averaged_weights():
            for b in self.val_batches:
                energy, forces, _ = forward(self.net, b, self.ntypes, need_virial=False)
                n = torch.as_tensor(b.natoms)
                e_ref.append((b.energy / n).numpy())
                e_pred.append((energy / n).numpy())
                f_ref.append(b.forces.numpy().ravel())
                f_pred.append(forces.numpy().ravel())
        if e_ref:
            plot_parity(np.concatenate(e_ref), np.concatenate(e_pred), np.concatenate(f_ref), np.concatenate(f_pred),
                        self.out / "parity.png", title="validation frames")


class _GracefulStop:
    """SIGINT (Ctrl-C) or SIGTERM during training: finish the step, validate, write the checkpoint and the
    plots, and return (``name`` is set to the signal's). A second signal interrupts at once. Handlers are
    installed only in the main thread (and only with ``install``) and restored on exit."""

    def __init__(self, install: bool = True):
        self.name = ""
        self.install = install
        self._old = {}

    def _handle(self, signum, frame):
        if self.name:
            raise KeyboardInterrupt
        self.name = signal.Signals(signum).name
        print(f"\n{self.name}: finishing this step, then writing the checkpoint and plots "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self):
        if self.install and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def train(cfg: Config, resume: str | None = None) -> dict:
    return Trainer(cfg, resume=resume).run()
