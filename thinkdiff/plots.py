"""Pictures of results people would rather look at than read."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from thinkdiff.storage import atomic_write_bytes, atomic_write_image  # noqa: E402


def plot_loss_curve(records: list[dict], out_png: Path) -> Path:
    """Loss (and learning rate) over steps from the training metrics log's rows."""
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
    return _save(fig, out_png)


def plot_cobsat_accuracy(series: dict[str, dict[int, float]], out_png: Path,
                         title: str = "CoBSAT accuracy per task", published: dict[str, float] | None = None) -> Path:
    """Grouped bars: accuracy per CoBSAT task (papers' column order), one group member per series
    (a shot, or a generator and a shot), labelled with its mean. With `published` (label -> mean), a
    second panel sets the measured means beside those reported by the papers, which are hatched."""
    from thinkdiff.eval.cobsat import COLUMN_ORDER, get_task

    if published:
        fig, (ax, means_ax) = plt.subplots(1, 2, figsize=(15 + len(series) // 3, 4.5), dpi=110,
                                           gridspec_kw={"width_ratios": [3, 2]})
        measured = {label: sum(per_task.values()) / len(per_task) for label, per_task in series.items()}
        labels = [*measured, *(f"published: {label}" for label in published)]
        values = [*measured.values(), *published.values()]
        bars = means_ax.barh(range(len(labels)), values, color=["C0"] * len(measured) + ["0.8"] * len(published))
        for bar in bars[len(measured):]:
            bar.set_hatch("//")
        means_ax.set_yticks(range(len(labels)), labels, fontsize="x-small")
        means_ax.invert_yaxis()
        means_ax.set_xlim(0, 1)
        means_ax.set_xlabel("mean accuracy")
        means_ax.set_title("measured (solid) and published (hatched) means")
    else:
        fig, ax = plt.subplots(figsize=(9 + len(series) // 3, 4), dpi=110)
    width = 0.8 / max(len(series), 1)
    for k, (label, per_task) in enumerate(series.items()):
        values = [per_task.get(t, 0.0) for t in COLUMN_ORDER]
        xs = [i + k * width for i in range(len(COLUMN_ORDER))]
        mean = sum(per_task.values()) / len(per_task)
        ax.bar(xs, values, width=width, label=f"{label} (mean {mean:.3f})")
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(COLUMN_ORDER))])
    ax.set_xticklabels([get_task(t).short for t in COLUMN_ORDER])
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    if published:  # the long title over both panels
        fig.suptitle(title)
        ax.set_title("accuracy per task")
    else:
        ax.set_title(title)
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, out_png)


CAPTION_LINE_PX = 14


def save_sample_grid(rows: list[tuple[list[Image.Image], str]], out_png: Path, cell: int = 128) -> Path:
    """One row per sample: its images side by side (demos, then the output) under a caption; each
    line of a caption is cut to the sheet's width (Pillow's default font is about 6 px a character)."""
    columns = max(len(images) for images, _ in rows)
    lines = max(len(caption.split("\n")) for _, caption in rows)
    chars = columns * cell // 6
    band = lines * CAPTION_LINE_PX + 2
    sheet = Image.new("RGB", (columns * cell, len(rows) * (cell + band)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (images, caption) in enumerate(rows):
        top = r * (cell + band)
        for k, line in enumerate(caption.split("\n")):
            draw.text((2, top + 2 + k * CAPTION_LINE_PX), line[:chars], fill=(0, 0, 0))
        for c, image in enumerate(images):
            sheet.paste(image.convert("RGB").resize((cell, cell)), (c * cell, top + band))
    atomic_write_image(out_png, sheet)
    return out_png


def _save(fig, out_png: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(out_png, buf.getvalue())
    return out_png
