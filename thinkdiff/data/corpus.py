"""Image corpora in img2dataset's Parquet output layout, and the generated offline demo corpus.

A corpus directory holds shards `{shard:05d}.parquet` with the columns img2dataset writes
(`key`, `caption`, `url`, `status`, `error_message`, `width`, `height`, `jpg`) plus a
`{shard:05d}_stats.json` per shard, and `manifest.json` once complete. The `key` is the join key
that every later stage keeps.
"""

from __future__ import annotations

import io
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from thinkdiff.config import CorpusConfig
from thinkdiff.errors import DataContractError
from thinkdiff.storage import (
    CORPUS_SCHEMA_VERSION,
    atomic_write_json,
    read_manifest,
    temp_path_for,
    write_manifest,
)

log = logging.getLogger(__name__)

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "purple": (140, 60, 180), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 0.3, "large": 0.7}


@dataclass
class CorpusImage:
    key: str
    image: Image.Image | None
    """None when the bytes could not be decoded; `error` says why."""
    error: str | None = None


def render_demo_image(shape: str, colour: str, background: str, size: str, side: int) -> Image.Image:
    """One coloured shape, centred, on a plain background."""
    image = Image.new("RGB", (side, side), COLOURS[background])
    draw = ImageDraw.Draw(image)
    half = SIZES[size] * side / 2
    c = side / 2
    box = (c - half, c - half, c + half, c + half)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    elif shape == "triangle":
        draw.polygon([(c, c - half), (c + half, c + half), (c - half, c + half)], fill=COLOURS[colour])
    else:
        draw.polygon([(c, c - half), (c + half, c), (c, c + half), (c - half, c)], fill=COLOURS[colour])
    return image


def demo_items(cfg: CorpusConfig) -> list[tuple[str, Image.Image]]:
    """`cfg.demo_images` (caption, image) pairs whose captions describe the picture; seeded."""
    rng = random.Random(cfg.seed)
    items = []
    for _ in range(cfg.demo_images):
        shape, size = rng.choice(SHAPES), rng.choice(list(SIZES))
        colour, background = rng.sample(list(COLOURS), 2)
        caption = f"a {size} {colour} {shape} on a {background} background"
        items.append((caption, render_demo_image(shape, colour, background, size, cfg.image_size)))
    return items


def jpeg_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


CORPUS_COLUMNS = pa.schema([
    ("key", pa.string()), ("caption", pa.string()), ("url", pa.string()), ("status", pa.string()),
    ("error_message", pa.string()), ("width", pa.int64()), ("height", pa.int64()), ("jpg", pa.binary()),
])


def build_demo_corpus(cfg: CorpusConfig, out_dir: Path) -> Path:
    """Write the demo corpus as img2dataset-layout shards into `out_dir` (skipped when complete)."""
    if read_manifest(out_dir) is not None:
        log.info("demo corpus %s is complete; skipping", out_dir)
        return out_dir
    items = demo_items(cfg)
    shards = []
    for shard_index, start in enumerate(range(0, len(items), cfg.shard_size)):
        chunk = items[start: start + cfg.shard_size]
        rows = {name: [] for name in CORPUS_COLUMNS.names}
        for offset, (caption, image) in enumerate(chunk):
            # img2dataset keys: shard index then position, zero-padded (9 digits for the default layout).
            rows["key"].append(f"{shard_index:05d}{offset:04d}")
            rows["caption"].append(caption)
            rows["url"].append(f"demo://{start + offset}")
            rows["status"].append("success")
            rows["error_message"].append(None)
            rows["width"].append(image.width)
            rows["height"].append(image.height)
            rows["jpg"].append(jpeg_bytes(image))
        name = f"{shard_index:05d}"
        path = out_dir / f"{name}.parquet"
        tmp = temp_path_for(path)
        pq.write_table(pa.table(rows, schema=CORPUS_COLUMNS), tmp)
        atomic_write_json(out_dir / f"{name}_stats.json", {"count": len(chunk), "successes": len(chunk), "failed_to_download": 0, "failed_to_resize": 0})
        tmp.replace(path)
        shards.append({"name": path.name, "count": len(chunk)})
    write_manifest(out_dir, {"stage": "corpus", "source": "demo", "schema_version": CORPUS_SCHEMA_VERSION, "shards": shards})
    log.info("demo corpus: %d images in %d shards -> %s", len(items), len(shards), out_dir)
    return out_dir


def corpus_shards(corpus_dir: Path) -> list[Path]:
    """The complete shards of a corpus directory, in order.

    Raises:
        FileNotFoundError: the directory has no shards.
    """
    shards = sorted(p for p in corpus_dir.glob("*.parquet") if not p.name.startswith("."))
    if not shards:
        raise FileNotFoundError(f"{corpus_dir}: no *.parquet corpus shards (img2dataset output_format='parquet')")
    return shards


def read_corpus_shard(path: Path) -> Iterator[CorpusImage]:
    """Successful rows of one shard, decoded; rows whose bytes do not decode carry an error instead."""
    parquet = pq.ParquetFile(path)
    names = set(parquet.schema_arrow.names)
    needed = {"key", "jpg", "status"}
    if not needed <= names:
        raise DataContractError(f"{path}: corpus shard lacks columns {sorted(needed - names)}; expected img2dataset parquet output")
    for batch in parquet.iter_batches(columns=["key", "status", "jpg"], batch_size=64):
        for key, status, data in zip(*(batch.column(i).to_pylist() for i in range(3)), strict=True):
            if status != "success":
                continue
            try:
                image = Image.open(io.BytesIO(data))
                image.load()
                yield CorpusImage(key=key, image=image.convert("RGB"))
            except Exception as err:  # noqa: BLE001 - PIL raises many types for corrupt data
                yield CorpusImage(key=key, image=None, error=f"{type(err).__name__}: {err}")
