"""Loss curves of a run as a PNG, for people who would rather look than read."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tessera.core.metrics import read_metrics  # noqa: E402


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), (int, float))]
    val = [(r["step"], r["val_loss"]) for r in records if isinstance(r.get("val_loss"), (int, float))]
    if not train and not val:
        raise ValueError(f"{run_dir}/metrics.jsonl holds no loss values to plot")
    fig, ax = plt.subplots(figsize=(8, 5))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss", linewidth=2)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(Path(run_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(out) if out else Path(run_dir) / "loss.png"
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out
