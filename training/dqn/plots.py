"""The validation curve of a training run as a PNG (``offload-train dqn``'s ``.png``)."""

from __future__ import annotations

__all__ = ["plot_curve"]


def plot_curve(trainer, path, title="DQN validation"):
    """PNG: validation reward per image of DQN against MDP and Baseline over training time."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from offload.atomic import atomic_path

    curve = trainer.curve
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if curve:
        t = [c["seconds"] for c in curve]
        ax.plot(t, [c["dqn"] for c in curve], "-o", ms=2.5, lw=1.2, label="DQN (float)")
        best = [c for c in curve if c["iteration"] == trainer.best_iteration]
        if best:
            ax.plot([best[0]["seconds"]], [best[0]["dqn"]], "*", ms=12, color="C3",
                    label=f"best (iteration {trainer.best_iteration})")
        lo, hi = 0, max(t[-1], 1e-9)
    else:
        lo, hi = 0, 1
    ax.hlines(trainer.val_mdp, lo, hi, colors="C1", linestyles="--", label="MDP")
    ax.hlines(trainer.val_base, lo, hi, colors="C2", linestyles=":", label="Baseline")
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("validation reward per image"
                  + (" (expected)" if trainer.cfg.val_reward == "expected" else ""))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
