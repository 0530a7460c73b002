"""Image files: which names are images, reading them as RGB (16-bit and float files scaled, not clipped), a fast
check of a dataset's files before training, and per-image reading for `predict.py` verbs.

    good = drop_bad_images(paths, strict=cfg.strict_data, where="UTKFace")  # in a DataModule's setup()
    loaded, failed = load_each(paths)                                           # in a predict verb
"""
from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from zoo.errors import ZooError

log = logging.getLogger(__name__)

# Formats PIL registers but cannot decode without extra software, or that are not pictures.
_NOT_PICTURES = {"BUFR", "GRIB", "HDF5", "MPEG", "WMF", "EPS", "IPTC", "FITS"}


def _readable_extensions() -> tuple[str, ...]:
    Image.init()
    return tuple(sorted(ext for ext, fmt in Image.registered_extensions().items()
                        if fmt in Image.OPEN and fmt not in _NOT_PICTURES))


IMAGE_EXTENSIONS = _readable_extensions()  # lower case, with the dot: .jpg, .png, .pgm, .tif, .webp, ...
_EXTENSION_SET = frozenset(IMAGE_EXTENSIONS)


class ImageReadError(ZooError):
    """An image file that is missing, empty, truncated or not an image; `path` and `reason` name which and why."""

    def __init__(self, message: str, path: str | Path = "", reason: str = ""):
        super().__init__(message)
        self.path, self.reason = Path(path), reason


def is_image(path: str | Path) -> bool:
    """True for a file name with an extension PIL can read (any letter case: .JPG, .pgm, .Tiff)."""
    return os.path.splitext(str(path))[1].lower() in _EXTENSION_SET


def missing_image_message(path: str | Path) -> str:
    """The one message for an image that is not there, whatever the task or verb."""
    return f"Image not found: {path}. Check the path (give image files or folders of images) and that the dataset is complete."


def to_rgb_array(im: Image.Image) -> np.ndarray:
    """A PIL image as (H, W, 3) uint8 RGB. 16-bit (I;16*), 32-bit integer (I) and float (F) grayscale are scaled to
    0..255 (PIL's own convert clips them, which turns a 16-bit photo white); EXIF rotation is applied."""
    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        a = np.asarray(im).astype(np.float64)
        if im.mode.startswith("I;16"):
            a = a / 257.0
        elif im.mode == "I":
            a = a / 257.0 if a.max(initial=0) > 255 else a
        else:
            a = a * 255.0 if a.max(initial=0) <= 1.0 else a
        gray = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    return np.asarray(im.convert("RGB"))


def load_rgb(path: str | Path) -> np.ndarray:
    """Read an image as an (H, W, 3) uint8 RGB array (grayscale, 16-bit, palette, RGBA and CMYK files converted).

    Raises `ImageReadError` (a ZooError) naming the file: not found, empty, truncated or not an image.
    """
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb_array(im)
    except FileNotFoundError:
        raise ImageReadError(missing_image_message(path), path, "not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        reason = _reason(path, e)
        raise ImageReadError(
            f"Cannot read image {path}: {reason}. Delete or replace the file (e.g. re-extract the dataset archive) "
            f"and run again.", path, reason) from None


def _reason(path: str | Path, error: Exception | None = None) -> str:
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
    except OSError:
        return "not found"
    if isinstance(error, UnidentifiedImageError) or error is None:
        return "not an image (or a corrupt header)"
    text = str(error).lower()
    if "truncated" in text or "broken data stream" in text or "image file is truncated" in text:
        return "truncated file"
    return f"corrupt ({str(error)[:80]})"


def save_rgb(path: str | Path, array: np.ndarray, quality: int = 92) -> None:
    """Write an (H, W, 3) uint8 array; the format follows the extension."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path, quality=quality)


# ----------------------------------------------------------------------------------------------------------------------
# The fast check of a dataset's files
# ----------------------------------------------------------------------------------------------------------------------
def _tail(path: str | Path, n: int = 64) -> bytes:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - n))
        return f.read()


def probe_image(path: str | Path) -> str | None:
    """Why `path` cannot be a training image, or None when it looks fine.

    Reads the header (format, size) and, for JPEG and PNG, the last bytes (the end-of-image marker / IEND chunk a
    truncated download lacks): milliseconds per file, without decoding the pixels.
    """
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        with Image.open(path) as im:
            fmt, (w, h) = im.format, im.size
    except FileNotFoundError:
        return "not found"
    except UnidentifiedImageError:
        return "not an image (or a corrupt header)"
    except (OSError, SyntaxError, ValueError) as e:
        return _reason(path, e)
    if w <= 0 or h <= 0:
        return f"corrupt (size {w}x{h})"
    try:
        tail = _tail(path)
    except OSError as e:
        return f"unreadable ({e})"
    if fmt == "JPEG" and b"\xff\xd9" not in tail:
        return "truncated file (no JPEG end marker)"
    if fmt == "PNG" and b"IEND" not in tail:
        return "truncated file (no PNG end chunk)"
    return None


@dataclass(frozen=True)
class BadImage:
    """A file `probe_image` refused, and why."""

    path: Path
    reason: str


def find_bad_images(paths: Sequence[str | Path], workers: int | None = None) -> list[BadImage]:
    """The files of `paths` that are not readable images (`probe_image`), in the order given. Threads: the check is
    file-system bound (1.3M ImageNet files take minutes on a network disk, seconds on a local SSD)."""
    paths = list(paths)
    if not paths:
        return []
    workers = workers or min(32, 4 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = list(pool.map(probe_image, paths, chunksize=256))
    return [BadImage(Path(p), r) for p, r in zip(paths, reasons) if r is not None]


def bad_images_report(bad: Sequence[BadImage], total: int, where: str, examples: int = 5) -> str:
    """'<where>: N of M image files cannot be read: a.jpg (empty file), b.png (truncated file), ...'."""
    names = ", ".join(f"{b.path} ({b.reason})" for b in bad[:examples]) + (", ..." if len(bad) > examples else "")
    return f"{where}: {len(bad)} of {total} image file(s) cannot be read: {names}"


def drop_bad_images(paths: Iterable[str | Path], strict: bool = False, where: str = "data") -> list[Path]:
    """`paths` without the files `probe_image` refuses, checked before training starts.

    Refused files are reported once (count and the first names) and skipped; with `strict` (`--set strict_data=true`)
    they are a ZooError instead. Returns the good paths in their original order.
    """
    paths = [Path(p) for p in paths]
    bad = find_bad_images(paths)
    if not bad:
        return paths
    report = bad_images_report(bad, len(paths), where)
    if strict:
        raise ZooError(f"{report}. Delete or replace them, or drop --set strict_data=true to skip them.")
    _warn_rank_zero(f"{report}. Skipped; --set strict_data=true makes this an error.")
    refused = {b.path for b in bad}
    return [p for p in paths if p not in refused]


def _warn_rank_zero(message: str) -> None:
    if int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")) or 0) == 0:
        log.warning(message)


# ----------------------------------------------------------------------------------------------------------------------
# predict.py: file and folder arguments, one image at a time
# ----------------------------------------------------------------------------------------------------------------------
def collect_images(items: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders searched recursively for image files (sorted). A path that does not exist, or a folder
    without images, is a ZooError with the same message in every task."""
    out: list[Path] = []
    for raw in items:
        p = Path(raw).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and is_image(f.name) and not f.name.startswith("."))
            if not found:
                raise ZooError(f"No image files under folder {p} (looked for {', '.join(IMAGE_EXTENSIONS[:8])}, ... "
                               f"in any letter case).")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise ZooError(missing_image_message(p))
    return out


def load_each(paths: Iterable[str | Path]) -> tuple[list[tuple[Path, np.ndarray]], list[ImageReadError]]:
    """Read every path with `load_rgb`: ([(path, RGB array)] of the readable ones, [errors] of the others)."""
    loaded, failed = [], []
    for p in paths:
        try:
            loaded.append((Path(p), load_rgb(p)))
        except ImageReadError as e:
            failed.append(e)
    return loaded, failed


def loaded_batches(paths: Sequence[str | Path], batch_size: int, failed: list[ImageReadError] | None = None):
    """Yield ([paths], [RGB arrays]) of the readable images, `batch_size` paths at a time. Errors of unreadable images
    are appended to `failed`, or the first one is raised when `failed` is None."""
    for start in range(0, len(paths), batch_size):
        loaded, bad = load_each(paths[start:start + batch_size])
        if bad:
            if failed is None:
                raise bad[0]
            failed.extend(bad)
        if loaded:
            yield [p for p, _ in loaded], [a for _, a in loaded]


def report_failed(failed: Sequence[ImageReadError], total: int) -> int:
    """Name the images a verb could not read on stderr; the exit status: 1 if any, else 0."""
    if not failed:
        return 0
    print(f"error: {len(failed)} of {total} image(s) could not be read:", file=sys.stderr)
    for e in failed:
        print(f"  {e.path}: {e.reason}", file=sys.stderr)
    return 1
