"""Offline stand-ins for VTAB-1k, written in the real NOAH layout, plus an upstream pretraining set.

Four tasks mirror one VTAB task each, so the mini experiment exercises the same code path and the
same kinds of skill (recognition, counting, localisation, orientation):

- `digits` (natural): real images, scikit-learn's bundled 8x8 handwritten digits, upsampled, as RGB.
- `count` (CLEVR-count analogue): 1..4 shapes on a noisy background; label = count - 1.
- `position` (dSprites-loc analogue): one shape; label = bin of its x position (4 bins).
- `orientation` (dSprites-ori analogue): one bar or isosceles triangle; label = bin of its axis
  angle, 4 bins over 180 degrees (a triangle and its 180-degree turn share a label, as bars do).

Class counts come from vision/tasks.yaml; they are smaller than the real tasks' (16 bins) so that a
~100k-parameter backbone fine-tuned for a few hundred CPU steps can learn them measurably.

`upstream_images` generates a different task (shape type x colour x image half, with grey
distractors) on the fly, to pretrain the tiny Vim before it is fine-tuned on the four tasks above;
the half makes the features keep some spatial layout, as natural-image pretraining does.

Shapes are drawn at 4x resolution and box-filtered down, so edges and small angles stay visible at
32x32. Everything is a function of the seed: the same seed writes byte-identical files.
"""

import colorsys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mambapeft.data.errors import DataError
from mambapeft.io import write_text_atomic
from mambapeft.data.vtab import task_info

SUPERSAMPLE = 4
JPEG_QUALITY = 95
BACKGROUND_NOISE_STD = 10.0
UPSTREAM_SHAPES = ("circle", "square", "triangle", "cross")
UPSTREAM_COLOURS = {"red": 0.0, "green": 1 / 3, "blue": 2 / 3}  # hue of each colour family
UPSTREAM_SIDES = ("left", "right")  # which half of the image holds the target shape
UPSTREAM_NUM_CLASSES = len(UPSTREAM_SHAPES) * len(UPSTREAM_COLOURS) * len(UPSTREAM_SIDES)

Generator = Callable[[np.random.Generator, np.ndarray, int], np.ndarray]


# --- shape rendering --------------------------------------------------------------------------

def _shape_polygon(kind: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a shape centred at (cx, cy), `radius` = centre-to-farthest-point, turned by `angle` (radians).

    Elongated shapes (`bar`, `wedge`) have their long axis along `angle`; `wedge` is an isosceles
    triangle whose apex points along `angle`.
    """
    outlines = {
        "square": [(np.cos(t), np.sin(t)) for t in np.pi / 4 + np.arange(4) * np.pi / 2],
        "triangle": [(np.cos(t), np.sin(t)) for t in -np.pi / 2 + np.arange(3) * 2 * np.pi / 3],
        "cross": [(x, y) for x, y in ((0.3, 1), (0.3, 0.3), (1, 0.3), (1, -0.3), (0.3, -0.3), (0.3, -1),
                                      (-0.3, -1), (-0.3, -0.3), (-1, -0.3), (-1, 0.3), (-0.3, 0.3), (-0.3, 1))],
        "bar": [(1, 0.22), (-1, 0.22), (-1, -0.22), (1, -0.22)],
        "wedge": [(1, 0), (-0.7, 0.42), (-0.7, -0.42)],
    }[kind]
    cos, sin = np.cos(angle), np.sin(angle)
    return [(cx + radius * (x * cos - y * sin), cy + radius * (x * sin + y * cos)) for x, y in outlines]


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, centre: tuple[float, float], radius: float, angle: float, colour) -> None:
    """Draw one filled shape; coordinates are in final-image pixels, scaled to the supersampled canvas."""
    cx, cy, r = centre[0] * SUPERSAMPLE, centre[1] * SUPERSAMPLE, radius * SUPERSAMPLE
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        draw.polygon(_shape_polygon(kind, cx, cy, r, angle), fill=colour)


def _render(rng: np.random.Generator, image_size: int, shapes: list[dict]) -> np.ndarray:
    """One uint8 (H, W, 3) image: dark random background, the shapes, then pixel noise."""
    size = image_size * SUPERSAMPLE
    background = tuple(int(v) for v in rng.integers(0, 70, size=3))
    canvas = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(canvas)
    for shape in shapes:
        _draw_shape(draw, shape["kind"], shape["centre"], shape["radius"], shape["angle"], shape["colour"])
    small = np.asarray(canvas.resize((image_size, image_size), Image.Resampling.BOX), dtype=np.float32)
    noisy = small + rng.normal(0.0, BACKGROUND_NOISE_STD, size=small.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _bright_colour(rng: np.random.Generator, hue: float | None = None) -> tuple[int, int, int]:
    """A saturated colour, of a random hue or near the given one (so it stands out of the dark background)."""
    hue = rng.random() if hue is None else (hue + rng.uniform(-0.04, 0.04)) % 1.0
    rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.65, 1.0), rng.uniform(0.75, 1.0))
    return tuple(int(round(255 * c)) for c in rgb)


def _grey(rng: np.random.Generator) -> tuple[int, int, int]:
    level = int(rng.integers(110, 220))
    return (level, level, level)


def _place(rng: np.random.Generator, image_size: int, radius: float, taken: list[tuple[float, float, float]], tries: int = 50):
    """A centre keeping the shape inside the image and, when possible, off the shapes already placed."""
    for _ in range(tries):
        centre = tuple(rng.uniform(radius, image_size - radius, size=2))
        if all(np.hypot(centre[0] - x, centre[1] - y) > radius + r + 0.5 for x, y, r in taken):
            break
    return centre


# --- the four tasks ---------------------------------------------------------------------------

def _count_images(rng: np.random.Generator, labels: np.ndarray, image_size: int) -> np.ndarray:
    """CLEVR-count analogue: label + 1 shapes of random kind, colour and size."""
    images = []
    for label in labels:
        taken, shapes = [], []
        for _ in range(label + 1):
            radius = image_size * rng.uniform(0.06, 0.11)
            centre = _place(rng, image_size, radius, taken)
            taken.append((*centre, radius))
            kind = str(rng.choice(("circle", "square", "triangle")))
            shapes.append(dict(kind=kind, centre=centre, radius=radius, angle=rng.uniform(0, 2 * np.pi), colour=_bright_colour(rng)))
        images.append(_render(rng, image_size, shapes))
    return np.stack(images)


def _position_images(rng: np.random.Generator, labels: np.ndarray, image_size: int) -> np.ndarray:
    """dSprites-loc analogue: one shape whose centre x lies in bin `label` of equal bins."""
    max_radius = image_size * 0.12
    span = image_size - 2 * max_radius  # centres range over [max_radius, size - max_radius]
    num_bins = task_info("position")["num_classes"]
    images = []
    for label in labels:
        radius = image_size * rng.uniform(0.07, 0.12)
        x = max_radius + (label + rng.random()) * span / num_bins
        y = rng.uniform(radius, image_size - radius)
        kind = str(rng.choice(("circle", "square", "triangle")))
        shape = dict(kind=kind, centre=(x, y), radius=radius, angle=rng.uniform(0, 2 * np.pi), colour=_bright_colour(rng))
        images.append(_render(rng, image_size, [shape]))
    return np.stack(images)


def _orientation_images(rng: np.random.Generator, labels: np.ndarray, image_size: int) -> np.ndarray:
    """dSprites-ori analogue: a bar or wedge whose axis angle (mod 180 degrees) lies in bin `label`."""
    num_bins = task_info("orientation")["num_classes"]
    images = []
    for label in labels:
        axis = (label + rng.random()) * np.pi / num_bins
        kind = str(rng.choice(("bar", "wedge")))
        flip = np.pi * rng.integers(0, 2)  # the wedge's apex may point either way along its axis
        radius = image_size * rng.uniform(0.25, 0.4)
        centre = tuple(image_size / 2 + rng.uniform(-0.12, 0.12, size=2) * image_size)
        shape = dict(kind=kind, centre=centre, radius=radius, angle=axis + flip, colour=_bright_colour(rng))
        images.append(_render(rng, image_size, [shape]))
    return np.stack(images)


def _digit_images(rng: np.random.Generator, labels: np.ndarray, image_size: int) -> np.ndarray:
    """Real handwritten digits (scikit-learn, 8x8, 0..16), one distinct image per label, bicubic upsampled."""
    from sklearn.datasets import load_digits  # imported here: only this task needs scikit-learn

    digits = load_digits()
    pools = {digit: list(rng.permutation(np.flatnonzero(digits.target == digit))) for digit in range(10)}
    images = []
    for label in labels:
        if not pools[label]:
            raise DataError(
                f"mini vision task 'digits': scikit-learn has only {np.sum(digits.target == label)} images of digit {label}; "
                "lower n_train + n_val + n_test (at most ~170 per class)"
            )
        grey = (digits.images[pools[label].pop()] * (255 / 16)).astype(np.uint8)
        upsampled = Image.fromarray(grey).resize((image_size, image_size), Image.Resampling.BICUBIC)
        images.append(np.asarray(upsampled.convert("RGB")))
    return np.stack(images)


GENERATORS: dict[str, Generator] = {
    "digits": _digit_images,
    "count": _count_images,
    "position": _position_images,
    "orientation": _orientation_images,
}


def _task_rng(seed: int, name: str) -> np.random.Generator:
    """A stream per (seed, task), so a task's data does not depend on which other tasks are written."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _balanced_labels(rng: np.random.Generator, n: int, num_classes: int) -> np.ndarray:
    """n labels, every class equally often (up to one), in random order."""
    return rng.permutation(np.arange(n) % num_classes).astype(np.int64)


def write_mini_vtab(
    root: str | Path,
    *,
    tasks: tuple[str, ...] = ("digits", "count", "position", "orientation"),
    seed: int = 0,
    image_size: int = 32,
    n_train: int = 160,
    n_val: int = 40,
    n_test: int = 200,
) -> dict:
    """Write the mini tasks under `root` in the VTAB-1k layout; return a manifest.

    Per task: images/{train800,val200,test}/NNNNNN.jpg (JPEG, quality 95) and the four list files;
    train800.txt holds n_train lines, val200.txt n_val, train800val200.txt both, test.txt n_test.
    Manifest: {task: {num_classes, splits: {split: n}, sha256: {list file: hex}}}.
    """
    unknown = [task for task in tasks if task not in GENERATORS]
    if unknown:
        raise DataError(f"unknown mini vision task(s) {unknown}; choose from {', '.join(GENERATORS)}")
    return {task: _write_task(Path(root) / task, task, seed, image_size, {"train800": n_train, "val200": n_val, "test": n_test}) for task in tasks}


def _write_task(task_dir: Path, task: str, seed: int, image_size: int, sizes: dict[str, int]) -> dict:
    num_classes = task_info(task)["num_classes"]
    rng = _task_rng(seed, task)
    labels = _balanced_labels(rng, sum(sizes.values()), num_classes)
    images = GENERATORS[task](rng, labels, image_size)
    lines, start = {}, 0
    for split, n in sizes.items():
        lines[split] = _write_split_images(task_dir, split, images[start:start + n], labels[start:start + n])
        start += n
    lines["train800val200"] = lines["train800"] + lines["val200"]
    checksums = {f"{split}.txt": write_text_atomic(task_dir / f"{split}.txt", "".join(rows)) for split, rows in lines.items()}
    return {"num_classes": num_classes, "splits": {split: len(rows) for split, rows in lines.items()}, "sha256": checksums}


def _write_split_images(task_dir: Path, split: str, images: np.ndarray, labels: np.ndarray) -> list[str]:
    """Save one split's images as JPEG; return its list lines ('images/<split>/NNNNNN.jpg <label>\\n')."""
    image_dir = task_dir / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, (image, label) in enumerate(zip(images, labels)):
        relative = f"images/{split}/{index:06d}.jpg"
        Image.fromarray(image).save(task_dir / relative, format="JPEG", quality=JPEG_QUALITY)
        rows.append(f"{relative} {label}\n")
    return rows


# --- upstream pretraining task ----------------------------------------------------------------

def upstream_images(n: int, *, image_size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """The tiny Vim's pretraining set: classify the one coloured shape by kind x colour family x
    the image half it is in.

    24 classes (circle/square/triangle/cross x red/green/blue x left/right) at random position
    within that half, size and rotation, with 0-2 grey distractor shapes of any kind. Generated in
    memory, deterministic per seed. Returns (images uint8 (n, H, W, 3), labels int64 (n,), num_classes).
    """
    rng = _task_rng(seed, "upstream")
    labels = _balanced_labels(rng, n, UPSTREAM_NUM_CLASSES)
    images = np.stack([_upstream_image(rng, int(label), image_size) for label in labels]) if n else np.zeros((0, image_size, image_size, 3), np.uint8)
    return images, labels, UPSTREAM_NUM_CLASSES


def _upstream_image(rng: np.random.Generator, label: int, image_size: int) -> np.ndarray:
    kind_colour, side = divmod(label, len(UPSTREAM_SIDES))
    kind = UPSTREAM_SHAPES[kind_colour // len(UPSTREAM_COLOURS)]
    hue = list(UPSTREAM_COLOURS.values())[kind_colour % len(UPSTREAM_COLOURS)]
    radius = image_size * rng.uniform(0.1, 0.2)
    half = image_size / 2
    x = rng.uniform(radius, half) if side == 0 else rng.uniform(half, image_size - radius)
    centre = (x, rng.uniform(radius, image_size - radius))
    taken = [(*centre, radius)]
    shapes = [dict(kind=kind, centre=centre, radius=radius, angle=rng.uniform(0, 2 * np.pi), colour=_bright_colour(rng, hue))]
    for _ in range(int(rng.integers(0, 3))):
        r = image_size * rng.uniform(0.07, 0.15)
        c = _place(rng, image_size, r, taken)
        taken.append((*c, r))
        shapes.append(dict(kind=str(rng.choice(UPSTREAM_SHAPES)), centre=c, radius=r, angle=rng.uniform(0, 2 * np.pi), colour=_grey(rng)))
    return _render(rng, image_size, shapes[::-1])  # target drawn last, on top of any distractor
