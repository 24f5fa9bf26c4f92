"""Any image data set laid out as `DIR/{train,val,test}/<class>/<image>` (miniImageNet's layout).

Every image is decoded once, resized to `image_size` x `image_size` with PIL's LANCZOS filter
(as the original MAML code's miniImageNet script did) unless it already has that size, and kept
in memory as uint8. Classes may hold different numbers of images: each split is one array padded
to its largest class, with the true count per class beside it, and the sampler draws only real
images. `check_episode_shape` (defined with the sampler, re-exported here) says which flag to
change when a class is too small for the episodes asked for.
"""

import os
import pathlib
import time

import numpy as np
from absl import logging
from PIL import Image

from maml_tf.data.episodes import Split, Splits, check_episode_shape
from maml_tf.errors import UserError

__all__ = ["IMAGE_SUFFIXES", "Split", "Splits", "check_episode_shape", "load_image_folder"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_MODES = {1: "L", 3: "RGB"}
# What a damaged or unsupported image file can raise in Pillow.
_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def load_image_folder(data_dir: str | os.PathLike, image_size: int, channels: int = 3) -> Splits:
    """Reads `data_dir/{train,val,test}/<class>/<image>` into memory.

    Classes are the sub-folders of each split, sorted by name; images are the files with an
    image suffix (`IMAGE_SUFFIXES`, any case) in a class folder, sorted by name. Hidden files
    and other files are ignored. Images are converted to RGB (`channels=3`) or 8-bit grayscale
    (`channels=1`) and resized with LANCZOS to `image_size` x `image_size`, ignoring the aspect
    ratio, as miniImageNet's images already are square.

    Args:
        data_dir: the data set's root (`--data_dir`).
        image_size: side of the stored images, e.g. 84 for miniImageNet.
        channels: 3 for RGB, 1 for grayscale.

    Returns:
        `Splits`; each `Split` holds uint8 `[classes, max_per_class, image_size, image_size,
        channels]` (classes with fewer images are zero-padded), int32 `counts [classes]` and
        the class folder names.

    Raises:
        UserError: one line naming the directory or file: `data_dir` or a split folder missing,
            a split without class folders, a class folder without images, an unreadable image.
    """
    if channels not in _MODES:
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if image_size < 1:
        raise ValueError(f"image_size must be at least 1, got {image_size}")
    root = pathlib.Path(data_dir)
    if not root.is_dir():
        raise UserError(f"--data_dir={root}: no such directory")
    splits = []
    for split_name in Splits._fields:
        start = time.perf_counter()
        split = _load_split(root / split_name, image_size, channels)
        logging.info(
            "%s: %d classes, %d images, %d to %d per class (%s, %.1f s)",
            split_name,
            len(split.names),
            int(split.counts.sum()),
            int(split.counts.min()),
            int(split.counts.max()),
            root / split_name,
            time.perf_counter() - start,
        )
        splits.append(split)
    return Splits(*splits)


def _load_split(directory: pathlib.Path, image_size: int, channels: int) -> Split:
    if not directory.is_dir():
        raise UserError(
            f"--data_dir={directory.parent}: the split folder {directory.name}/ is missing "
            "(expected train/, val/ and test/, each with one folder per class)"
        )
    class_dirs = sorted(
        path for path in directory.iterdir() if path.is_dir() and not path.name.startswith(".")
    )
    if not class_dirs:
        raise UserError(f"{directory}: no class folders")
    files = []
    for class_dir in class_dirs:
        images = sorted(
            path
            for path in class_dir.iterdir()
            if path.suffix.lower() in IMAGE_SUFFIXES
            and not path.name.startswith(".")
            and path.is_file()
        )
        if not images:
            raise UserError(
                f"{class_dir}: class folder holds no images ({', '.join(IMAGE_SUFFIXES)})"
            )
        files.append(images)

    counts = np.array([len(images) for images in files], np.int32)
    # Filled in place: stacking per-class lists would hold the data set twice in memory.
    array = np.zeros([len(files), counts.max(), image_size, image_size, channels], np.uint8)
    for i, images in enumerate(files):
        for j, path in enumerate(images):
            array[i, j] = _read_image(path, image_size, channels)
    return Split(array, counts, tuple(path.name for path in class_dirs))


def _read_image(path: pathlib.Path, image_size: int, channels: int) -> np.ndarray:
    """uint8 `[image_size, image_size, channels]`."""
    try:
        with Image.open(path) as image:
            image = image.convert(_MODES[channels])
            if image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), resample=Image.Resampling.LANCZOS)
            pixels = np.asarray(image, np.uint8)
    except _READ_ERRORS as error:
        reason = str(error).splitlines()[0] if str(error) else ""
        raise UserError(f"{path}: cannot read image ({type(error).__name__}: {reason})") from error
    return pixels.reshape(image_size, image_size, channels)
