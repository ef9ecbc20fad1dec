"""VTAB-1k in the NOAH / RepAdapter layout: task table, split lists, image preprocessing, caches.

On-disk layout (what MambaPEFT reads through mmpretrain's `CustomDataset`)::

    <root>/<task>/train800.txt, val200.txt, train800val200.txt, test.txt
    <root>/<task>/images/<split>/000000.jpg ...

Each list line is `<image path relative to the task dir> <int label>`. MambaPEFT trains on
`train800val200` and reports `test`. Preprocessing is the same for train and test, with no
augmentation: decode, force RGB, resize to (resolution, resolution) with PIL bicubic (aspect ratio
not kept, no crop). Normalisation with `IMAGENET_MEAN`/`IMAGENET_STD` is left to the trainer.
"""

import functools
import hashlib
import logging
import sys
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from mambapeft.data.errors import DataError, where
from mambapeft.data.files import read_yaml
from mambapeft.io import atomic_path, sha256_file

log = logging.getLogger(__name__)

SPLITS = ("train800", "val200", "train800val200", "test")

# mmpretrain's data_preprocessor values (123.675, 116.28, 103.53) / (58.395, 57.12, 57.375) over 255.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

TASKS_YAML = Path(__file__).resolve().parents[3] / "vision" / "tasks.yaml"

OBTAIN_HINT = (
    "VTAB-1k comes preprocessed from RepAdapter's vtab-1k.zip (Google Drive id "
    "1yZKwiKdsBzTfBgnStRveYMokc7GMMd5p); unzip it and move the task folders up one level so that "
    "<root>/<task>/train800val200.txt exists, or write the offline stand-ins with "
    "mambapeft.data.mini_vision.write_mini_vtab"
)

_REQUIRED_TASK_KEYS = ("display", "group", "num_classes")
_GROUPS = ("natural", "specialized", "structured")


@functools.cache
def _load_task_table() -> dict[str, dict]:
    table = read_yaml(TASKS_YAML)
    for name, entry in table.items():
        _validate_task_entry(name, entry)
    return table


def _validate_task_entry(name: str, entry: dict) -> None:
    missing = [key for key in _REQUIRED_TASK_KEYS if key not in (entry or {})]
    if missing:
        raise DataError(f"{TASKS_YAML}: task '{name}' lacks {missing}; every task needs {list(_REQUIRED_TASK_KEYS)}")
    if entry["group"] not in _GROUPS:
        raise DataError(f"{TASKS_YAML}: task '{name}' has group '{entry['group']}'; use one of {list(_GROUPS)}")
    if not isinstance(entry["num_classes"], int) or entry["num_classes"] < 2:
        raise DataError(f"{TASKS_YAML}: task '{name}' has num_classes={entry['num_classes']!r}; use an integer >= 2")


def all_tasks() -> dict[str, dict]:
    """Every task in vision/tasks.yaml: {name: {display, group, num_classes, test_size, mini?}}."""
    return {name: dict(entry, name=name, mini=bool(entry.get("mini", False))) for name, entry in _load_task_table().items()}


def task_info(task: str) -> dict:
    """The tasks.yaml entry of one task (plus its `name`); unknown names list the known ones."""
    tasks = all_tasks()
    if task not in tasks:
        raise DataError(f"{TASKS_YAML}: unknown vision task '{task}'; known tasks: {', '.join(tasks)}")
    return tasks[task]


def split_file(root: str | Path, task: str, split: str) -> Path:
    """Path of one split list, `<root>/<task>/<split>.txt`."""
    if split not in SPLITS:
        raise DataError(f"unknown VTAB-1k split '{split}' for task '{task}'; use one of {', '.join(SPLITS)}")
    return Path(root) / task / f"{split}.txt"


def read_split(root: str | Path, task: str, split: str, num_classes: int | None = None) -> list[tuple[str, int]]:
    """Read and validate one split list: [(image path relative to the task dir, label), ...].

    Every line must be `<path> <int label>` with the image present and 0 <= label < num_classes
    (default: the task's num_classes from tasks.yaml). Blank lines are skipped; an empty list is an error.
    """
    if num_classes is None:
        num_classes = task_info(task)["num_classes"]
    list_file = split_file(root, task, split)
    if not list_file.is_file():
        raise DataError(f"{list_file}: split list not found. {OBTAIN_HINT}")
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise DataError(f"{list_file}: not UTF-8 text ({error}); the list must hold '<image path> <label>' lines") from None
    samples = [
        _parse_list_line(line, list_file, number, num_classes)
        for number, line in enumerate(lines, start=1)
        if line.strip()
    ]
    if not samples:
        raise DataError(f"{list_file}: split is empty; it must list at least one '<image path> <label>' line")
    return samples


def _parse_list_line(line: str, list_file: Path, number: int, num_classes: int) -> tuple[str, int]:
    fields = line.strip().rsplit(maxsplit=1)
    if len(fields) != 2:
        raise DataError(f"{where(list_file, number)}: malformed line {line!r}; expected '<image path> <int label>'")
    relative, label_text = fields
    try:
        label = int(label_text)
    except ValueError:
        raise DataError(f"{where(list_file, number)}: label {label_text!r} is not an integer; expected '<image path> <int label>'") from None
    if not 0 <= label < num_classes:
        raise DataError(
            f"{where(list_file, number)}: label {label} is outside [0, {num_classes}); "
            f"fix the line or the task's num_classes in {TASKS_YAML.name}"
        )
    if not (list_file.parent / relative).is_file():
        raise DataError(f"{where(list_file, number)}: image {list_file.parent / relative} does not exist; re-extract the task folder")
    return relative, label


def load_rgb(path: str | Path) -> Image.Image:
    """Fully decode an image as RGB (mmcv forces 3 channels too); unreadable or truncated files raise DataError."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{path}: image does not exist; re-extract the task folder") from None
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as error:
        raise DataError(f"{path}: cannot decode image ({error}); the file is unreadable or truncated, re-extract it") from None


def preprocess_image(path: str | Path, resolution: int) -> np.ndarray:
    """Decode one image as MambaPEFT does: RGB, bicubic resize to (resolution, resolution), no crop.

    Returns uint8 (resolution, resolution, 3). mmcv decodes with OpenCV rather than PIL; both use
    libjpeg, so pixels may differ by rounding in chroma upsampling, not in geometry.
    """
    resized = load_rgb(path).resize((resolution, resolution), Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.uint8)


def build_image_cache(
    root: str | Path,
    task: str,
    split: str,
    resolution: int,
    out_path: str | Path,
    num_classes: int | None = None,
) -> dict:
    """Decode and resize every image of a split once, into an `.npz` the trainer loads.

    The archive holds `images` uint8 (N, H, W, 3), `labels` int64 (N,), `task`, `split`,
    `resolution`, `list_sha256` (of the split list, to detect a stale cache) and `content_sha256`
    (of the images' then the labels' bytes, checked by `load_image_cache`). Images are
    streamed into an uncompressed archive one at a time, so memory stays at one image even for
    the 73,728-image dSprites test split; the file appears only when complete.
    Returns {n, num_classes, sha256 (of the split list)}.
    """
    samples = read_split(root, task, split, num_classes)
    num_classes = num_classes if num_classes is not None else task_info(task)["num_classes"]
    task_dir = Path(root) / task
    list_sha256 = sha256_file(split_file(root, task, split))
    images = (preprocess_image(task_dir / relative, resolution) for relative, _ in logged_progress(samples, f"{task}/{split}"))
    labels = np.array([label for _, label in samples], dtype=np.int64)
    content = hashlib.sha256()
    with atomic_path(out_path) as temporary:
        with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            _stream_npy_member(archive, "images", (len(samples), resolution, resolution, 3), np.uint8, images, content)
            _write_npy_member(archive, "labels", labels)
            content.update(labels)
            _write_npy_member(archive, "content_sha256", np.array(content.hexdigest()))
            _write_npy_member(archive, "task", np.array(task))
            _write_npy_member(archive, "split", np.array(split))
            _write_npy_member(archive, "resolution", np.array(resolution, dtype=np.int64))
            _write_npy_member(archive, "list_sha256", np.array(list_sha256))
    return {"n": len(samples), "num_classes": num_classes, "sha256": list_sha256}


def logged_progress(items: Sequence, description: str) -> Iterator:
    """Yield `items`; show a tqdm bar on a terminal, otherwise log a line every ~10%."""
    if sys.stderr.isatty():
        yield from tqdm(items, desc=description, unit="img")
        return
    total = len(items)
    step = max(1, total // 10)
    for done, item in enumerate(items, start=1):
        yield item
        if done % step == 0 or done == total:
            log.info("%s: %d/%d images (%d%%)", description, done, total, 100 * done // total)


def _stream_npy_member(archive: zipfile.ZipFile, name: str, shape: tuple, dtype, rows: Iterable[np.ndarray],
                       content) -> None:
    """Write an .npy member whose rows arrive one by one (the same bytes `np.savez` would write),
    feeding the array's bytes to the `content` digest as they go."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
        np.lib.format.write_array_header_2_0(member, header)
        for row in rows:
            data = np.ascontiguousarray(row, dtype=dtype).tobytes()
            content.update(data)
            member.write(data)


def _write_npy_member(archive: zipfile.ZipFile, name: str, array: np.ndarray) -> None:
    with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
        np.lib.format.write_array(member, array, allow_pickle=False)


def load_image_cache(path: str | Path, mmap: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Load (images uint8 (N, H, W, 3), labels int64 (N,)) written by `build_image_cache`.

    With `mmap=True` the images are a read-only memory map of the archive (index it per batch);
    use it for test splits too large for RAM. Either way the images and labels must match the
    checksum recorded when the cache was built: the zip's own CRCs are not read through a memory map.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image cache not found; build it with build_image_cache (mambapeft prepare)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            labels = archive["labels"]
            images = _memmap_npz_member(path, "images") if mmap else archive["images"]
            recorded = str(archive["content_sha256"]) if "content_sha256" in archive.files else None
    except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError) as error:
        raise DataError(f"{path}: image cache is corrupt ({error!r}); delete it and rebuild it") from None
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or len(images) != len(labels):
        raise DataError(
            f"{path}: image cache holds images {images.shape} {images.dtype} and {len(labels)} labels; "
            "expected uint8 (N, H, W, 3) with N labels, delete it and rebuild it"
        )
    if recorded is None:
        raise DataError(f"{path}: image cache has no content checksum (built by an older mambapeft); "
                        "delete it and rebuild it")
    if _content_sha256(images, labels) != recorded:
        raise DataError(f"{path}: image cache is corrupt (its images or labels differ from the checksum "
                        "recorded when it was built); delete it and rebuild it")
    return images, labels


def _content_sha256(images: np.ndarray, labels: np.ndarray) -> str:
    """SHA-256 of the images' then the labels' bytes, as `build_image_cache` records it."""
    content = hashlib.sha256()
    for start in range(0, len(images), 256):  # in blocks: a memory-mapped split may not fit in RAM
        content.update(np.ascontiguousarray(images[start:start + 256]))
    content.update(np.ascontiguousarray(labels, dtype=np.int64))
    return content.hexdigest()


_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _memmap_npz_member(path: Path, name: str) -> np.ndarray:
    """Memory-map an uncompressed .npy member of an .npz without reading it."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(f"{name}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError(f"member {name}.npy is compressed and cannot be memory-mapped")
    with open(path, "rb") as handle:
        # The local file header (30 bytes + name + extra field) precedes the member's data.
        handle.seek(info.header_offset + 26)
        name_length, extra_length = np.frombuffer(handle.read(4), dtype="<u2")
        handle.seek(info.header_offset + 30 + int(name_length) + int(extra_length))
        read_header = _NPY_HEADER_READERS[np.lib.format.read_magic(handle)]
        shape, fortran_order, dtype = read_header(handle)
        offset = handle.tell()
    if fortran_order:
        raise ValueError(f"member {name}.npy is Fortran-ordered")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
