"""Learning-curve and parity plots (PNG) for training runs and exported models."""

from __future__ import annotations

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_lcurve(rows: list[dict], path, title: str = "learning curve") -> None:
    """Validation (and training) RMSE of energy per atom and of forces against training step."""
    plt = _plt()
    step = np.array([r["step"] for r in rows])
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].semilogy(step, [r["rmse_e_trn"] * 1000 for r in rows], label="train", alpha=0.6)
    axes[0].semilogy(step, [r["rmse_e_val"] * 1000 for r in rows], label="validation")
    axes[0].set_ylabel("energy RMSE (meV/atom)")
    axes[1].semilogy(step, [r["rmse_f_trn"] for r in rows], label="train", alpha=0.6)
    axes[1].semilogy(step, [r["rmse_f_val"] for r in rows], label="validation")
    axes[1].set_ylabel("force RMSE (eV/Å)")
    axes[2].semilogy(step, [r["lr"] for r in rows])
    axes[2].set_ylabel("learning rate")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_parity(e_ref, e_pred, f_ref, f_pred, path, title: str = "parity") -> None:
    """Predicted against reference: energy per atom (eV/atom, shifted by the reference mean) and force
    components (eV/Å), with RMSEs in the legend."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    shift = float(np.mean(e_ref))
    rmse_e = float(np.sqrt(np.mean((e_pred - e_ref) ** 2)))
    rmse_f = float(np.sqrt(np.mean((f_pred - f_ref) ** 2)))
    axes[0].scatter((e_ref - shift) * 1000, (e_pred - shift) * 1000, s=8, label=f"RMSE {rmse_e * 1000:.2f} meV/atom")
    minus = f" - ({shift:.3f} eV)" if abs(shift) >= 5e-4 else ""  # training energies may already be bias-free
    axes[0].set_xlabel(f"DFT energy per atom{minus} (meV)")
    axes[0].set_ylabel(f"model energy per atom{minus} (meV)")
    axes[1].scatter(f_ref, f_pred, s=2, alpha=0.4, label=f"RMSE {rmse_f:.3f} eV/Å")
    axes[1].set_xlabel("DFT force component (eV/Å)")
    axes[1].set_ylabel("model force component (eV/Å)")
    for ax in axes:
        ax.xaxis.set_major_locator(plt.MaxNLocator(6))
        lo, hi = ax.get_xlim()
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.legend(loc="upper left")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
