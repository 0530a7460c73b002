"""Image reading with errors that name the file, and writing for fixtures and demo data."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from zoo.errors import ZooError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def is_image(path: str | Path) -> bool:
    """True for a file name with an image extension (any case)."""
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def load_rgb(path: str | Path) -> np.ndarray:
    """Read an image as an (H, W, 3) uint8 RGB array; grayscale, palette, RGBA and CMYK files are converted."""
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise ZooError(f"Image file not found: {path}. Check --data-dir and that the dataset is complete.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ZooError(
            f"Cannot read image {path}: {e}. The file is corrupt or not an image; delete or replace it "
            f"(e.g. re-extract the dataset archive) and run again."
        ) from None


def save_rgb(path: str | Path, array: np.ndarray, quality: int = 92) -> None:
    """Write an (H, W, 3) uint8 array; the format follows the extension."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path, quality=quality)
