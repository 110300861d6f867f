"""Pictures of results people would rather look at than read."""

from __future__ import annotations

import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402

from thinkdiff.storage import atomic_write_bytes  # noqa: E402


def plot_loss_curve(metrics_jsonl: Path, out_png: Path) -> Path:
    """Loss (and learning rate) over steps from the training metrics log."""
    records = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line]
    steps = [r["step"] for r in records]
    fig, loss_ax = plt.subplots(figsize=(7, 4), dpi=110)
    loss_ax.plot(steps, [r["loss"] for r in records], color="tab:blue", marker="o", markersize=3)
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("T5 decoder loss", color="tab:blue")
    lr_ax = loss_ax.twinx()
    lr_ax.plot(steps, [r["lr"] for r in records], color="tab:orange", linestyle="--")
    lr_ax.set_ylabel("learning rate", color="tab:orange")
    loss_ax.set_title("aligner training")
    loss_ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(out_png, buf.getvalue())
    return out_png
