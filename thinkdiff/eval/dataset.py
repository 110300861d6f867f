"""CoBSAT image sets: the real dataset layout in a local directory, and a synthetic set in the same
layout whose factors a program can read back (for offline tests and the tiny preset).

Real data: download `datasets.zip` of the Hugging Face dataset `yzeng58/CoBSAT` and unzip it so
that `{root}/datasets/color_car/red_car.jpg` exists.

Synthetic renders: a top band in the palette colour of the attribute's option index, a bottom band
in the colour of the object's option index, and the two display words in between. The synthetic
judge reads the bands back; on clean renders it is exact (a unit test holds it to >= 99.5%).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from thinkdiff.errors import DataContractError
from thinkdiff.eval.cobsat import ITEMS, TASKS, Task, display
from thinkdiff.storage import atomic_write_bytes, atomic_write_image

# Ten colours far apart in RGB, so JPEG and resizing never move a band to another code. They are
# the CoBSAT colours in option order, so a colour item's band shows that colour.
PALETTE = np.array([
    (255, 220, 0), (255, 255, 255), (220, 20, 20), (128, 0, 128), (255, 150, 200),
    (255, 140, 0), (0, 160, 0), (120, 70, 20), (0, 60, 220), (0, 0, 0),
], dtype=np.float32)
SYNTHETIC_MARKER = "SYNTHETIC.txt"
THEMES = sorted({(t.attribute, t.object) for t in TASKS})


@dataclass(frozen=True)
class CobsatDataset:
    root: Path

    def image(self, relative_path: str) -> Image.Image:
        with Image.open(self.root / relative_path) as image:
            return image.convert("RGB")

    def item(self, task: Task, attribute: str, obj: str) -> Image.Image:
        return self.image(f"datasets/{task.attribute}_{obj}/{attribute}_{obj}.jpg")

    @property
    def is_synthetic(self) -> bool:
        return (self.root / SYNTHETIC_MARKER).is_file()


def all_item_paths() -> list[str]:
    return [f"datasets/{attr}_{o}/{a}_{o}.jpg"
            for attr, obj_space in THEMES for o in ITEMS[obj_space] for a in ITEMS[attr]]


def open_dataset(root: str | Path) -> CobsatDataset:
    """A CoBSAT directory with every item image present.

    Raises:
        FileNotFoundError: names the missing files (the first few and how many) and the fix.
    """
    root = Path(root)
    missing = [p for p in all_item_paths() if not (root / p).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{root}: {len(missing)} of {len(all_item_paths())} CoBSAT images missing, e.g. {missing[:3]}. "
            "Unzip datasets.zip of the Hugging Face dataset yzeng58/CoBSAT there (so that "
            f"{root}/datasets/color_car/red_car.jpg exists), or use the synthetic set (eval.dataset=synthetic)"
        )
    return CobsatDataset(root)


def render_item(attribute_space: str, attribute: str, object_space: str, obj: str, size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    band = size // 4
    draw.rectangle((0, 0, size, band), fill=tuple(int(c) for c in PALETTE[ITEMS[attribute_space].index(attribute)]))
    draw.rectangle((0, size - band, size, size), fill=tuple(int(c) for c in PALETTE[ITEMS[object_space].index(obj)]))
    draw.text((4, band + 4), display(attribute), fill=(255, 255, 255))
    draw.text((4, size // 2), display(obj), fill=(255, 255, 255))
    return image


def make_synthetic_dataset(root: str | Path, size: int = 96) -> CobsatDataset:
    """Write the synthetic set (every theme, item and file name of the real one, plus the theme
    CSVs); existing files are kept, so a rerun completes an interrupted one."""
    root = Path(root)
    if size < 32:  # the judge reads two colour bands of a quarter of the height each
        raise ValueError(f"image size {size}: use at least 32 (--size, eval.synthetic_image_size)")
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"{root} is a file: give a directory for the synthetic CoBSAT set")
    drawn = _synthetic_size(root)
    if drawn is not None and drawn != size:
        raise DataContractError(f"{root} holds the synthetic CoBSAT set at {drawn} px, not {size}: "
                                f"give another directory, or delete this one to draw it again at {size} px")
    if (root / SYNTHETIC_MARKER).is_file():
        return open_dataset(root)  # complete: the marker is written last
    for attr, obj_space in THEMES:
        rows = []
        for obj in ITEMS[obj_space]:
            for attribute in ITEMS[attr]:
                rel = f"datasets/{attr}_{obj}/{attribute}_{obj}.jpg"
                if not (root / rel).is_file():
                    atomic_write_image(root / rel, render_item(attr, attribute, obj_space, obj, size), quality=90)
                rows.append({"image": rel, "caption": f"{display(attribute)} {display(obj)}"})
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=["image", "caption"])
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(root / f"{attr}_{obj_space}.csv", text.getvalue().encode())
    atomic_write_bytes(root / SYNTHETIC_MARKER,
                       f"synthetic CoBSAT-format set made by thinkdiff\nsize: {size}\n".encode())
    return open_dataset(root)


def _synthetic_size(root: Path) -> int | None:
    """The side of the images a (possibly partial) synthetic set was drawn at; None if none is drawn."""
    marker = root / SYNTHETIC_MARKER
    if marker.is_file():
        for line in marker.read_text().splitlines():
            if line.startswith("size: "):
                return int(line.removeprefix("size: "))
    # A set older than the size line: measure one of its drawn images.
    drawn = next((root / rel for rel in all_item_paths() if (root / rel).is_file()), None)
    if drawn is None:
        return None
    with Image.open(drawn) as image:
        return image.size[0]


def read_factors(image: Image.Image, task: Task) -> tuple[int, int]:
    """The synthetic judge: (detail option, object option), 1-based, from the two colour bands."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    h = array.shape[0]
    band = h // 4
    # The band centres, away from edges that JPEG and resizing blur.
    top = array[band // 4: band - band // 4].reshape(-1, 3).mean(0)
    bottom = array[h - band + band // 4: h - band // 4].reshape(-1, 3).mean(0)
    nearest = lambda colour: int(np.argmin(((PALETTE - colour) ** 2).sum(1))) + 1  # noqa: E731
    return nearest(top), nearest(bottom)
