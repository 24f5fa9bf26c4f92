"""Omniglot (Lake et al., 2015) from the official zips, their folders or TFDS, and its meta-splits.

Images follow the original MAML code (Finn et al., 2017, `cbfinn/maml`): resized once to 28x28
with PIL's LANCZOS filter and inverted so that ink is high (that code fed `1 - image / 255`).
They are stored as uint8, ink 255, and the sampler scales them to [0, 1].

One difference from that code is deliberate: its resize script called
`Image.resize((28, 28), LANCZOS)` on the one-bit PNGs, and Pillow silently resizes one-bit images
with nearest neighbour whatever filter is asked for, so its 28x28 images were binary. Here the
image is converted to 8-bit grayscale first, so LANCZOS really filters and the small images keep
grey levels; `resample="nearest"` reproduces the original binary images exactly.

Reference: B. M. Lake, R. Salakhutdinov, J. B. Tenenbaum. Human-level concept learning through
probabilistic program induction. Science 350(6266), 2015.
"""

import contextlib
import hashlib
import io
import os
import pathlib
import socket
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import numpy as np
from absl import logging
from PIL import Image

from maml_tf.config import ROTATIONS
from maml_tf.data.episodes import Split, Splits, check_rotations, make_split
from maml_tf.errors import UserError

PARTS = ("background", "evaluation")
_RESAMPLE = {"lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}
# Where TFDS downloads the official zips from.
_TFDS_DOWNLOAD_HOST = "github.com"
# Bump when the decoded arrays change for the same files, so old caches are not reused.
_CACHE_VERSION = 1
# What reading a damaged member or image can raise, from zipfile, zlib and Pillow.
_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, zipfile.BadZipFile, zlib.error)


class OmniglotPart(NamedTuple):
    """One official part of Omniglot (background or evaluation).

    Attributes:
        images: uint8 `[characters, images_per_character, 28, 28, 1]`, ink 255, background 0.
            Characters are sorted by alphabet folder then character folder; the images of a
            character by file name (drawer), or in TFDS record order for `load_omniglot_tfds`.
        names: `"Alphabet/characterNN"` per character, in the same order.
    """

    images: np.ndarray
    names: tuple[str, ...]


class OmniglotData(NamedTuple):
    """Both official parts: background (964 characters) and evaluation (659)."""

    background: OmniglotPart
    evaluation: OmniglotPart


def load_omniglot(
    data_dir: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    *,
    expected_characters: tuple[int | None, int | None] = (964, 659),
    images_per_character: int = 20,
    image_size: int = 28,
    resample: str = "lanczos",
) -> OmniglotData:
    """Loads Omniglot from the official files in `data_dir`.

    Each part is read from `images_<part>.zip` (read in place, not extracted) or, when the zip
    is absent, from the extracted folder `images_<part>/`; the zip wins when both are there.
    Either holds `Alphabet/characterNN/XXXX_YY.png`, below an optional top folder named like the
    part. Hidden files, `__MACOSX/` and files that are not PNGs are ignored.

    Args:
        data_dir: the directory holding the zips or folders (`--data_dir`).
        cache_dir: where to keep the decoded arrays as `.npz`, keyed by the contents of the
            source files and the preprocessing; None disables the cache. Nothing is ever
            written to `data_dir`.
        expected_characters: characters expected in (background, evaluation); None skips the
            check for that part.
        images_per_character: images every character must have.
        image_size: side of the resized images.
        resample: `"lanczos"` (8-bit grayscale, then LANCZOS) or `"nearest"` (binary, as the
            original MAML data); see the module docstring.

    Returns:
        `OmniglotData` with uint8 `[characters, images_per_character, image_size, image_size, 1]`
        arrays, ink 255.

    Raises:
        UserError: one line naming the file or directory: `data_dir` missing, a part missing, a
            damaged zip, an unreadable image, an empty character folder, a PNG outside the
            layout, or counts that differ from the expected ones.
    """
    if resample not in _RESAMPLE:
        raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {resample!r}")
    data_dir = pathlib.Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"--data_dir={data_dir}: no such directory")
    sources = [_find_source(data_dir, part) for part in PARTS]

    cache_path = None
    if cache_dir is not None:
        key = _cache_key(sources, image_size, resample)
        cache_path = pathlib.Path(cache_dir).expanduser() / f"omniglot_{key}.npz"
        data = _read_cache(cache_path)
        if data is not None:
            logging.info("Omniglot: decoded arrays read from the cache %s", cache_path)
            for part, source, expected, values in zip(
                PARTS, sources, expected_characters, data, strict=True
            ):
                _check_part_shape(source, values, expected, images_per_character)
                _log_counts(part, values, str(cache_path))
            return data

    parts = []
    for part, source, expected in zip(PARTS, sources, expected_characters, strict=True):
        start = time.perf_counter()
        with contextlib.ExitStack() as stack:
            characters, read = _list_source(source, part, stack)
            _check_counts(str(source.path), characters, expected, images_per_character)
            images = _decode_characters(source, characters, read, image_size, resample)
        values = OmniglotPart(images, tuple(characters))
        logging.info("Omniglot %s decoded in %.1f s", part, time.perf_counter() - start)
        _log_counts(part, values, str(source.path))
        parts.append(values)
    data = OmniglotData(*parts)
    if cache_path is not None:
        _write_cache(cache_path, data)
    return data


def load_omniglot_tfds(
    tfds_data_dir: str | os.PathLike | None = None,
    *,
    expected_characters: tuple[int | None, int | None] = (964, 659),
    images_per_character: int = 20,
    image_size: int = 28,
    resample: str = "lanczos",
) -> OmniglotData:
    """Loads Omniglot through TensorFlow Datasets: split `train` is background, `test` evaluation.

    TFDS downloads the official zips from GitHub when the data set is not built yet in
    `tfds_data_dir`; offline that fails, and this raises a UserError pointing to `--data_dir`.
    Characters come out in the order of `load_omniglot` (alphabet, then character number); the
    images of a character in TFDS record order, which does not follow the drawer.

    Args:
        tfds_data_dir: TFDS's data directory; None uses TFDS's default (~/tensorflow_datasets).
        expected_characters: as for `load_omniglot`.
        images_per_character: as for `load_omniglot`.
        image_size: as for `load_omniglot`.
        resample: as for `load_omniglot`.

    Returns:
        `OmniglotData`, as `load_omniglot` returns.

    Raises:
        UserError: when TFDS cannot download or build the data set, or the counts are wrong.
    """
    # Imported here: it takes seconds and only this path needs it.
    import tensorflow_datasets as tfds

    hint = "pass --data_dir with the official images_background.zip and images_evaluation.zip"
    builder = tfds.builder("omniglot", data_dir=tfds_data_dir)
    # Offline, TFDS retries each download with back-off for minutes before it gives up.
    if not builder.is_prepared() and not _can_connect(_TFDS_DOWNLOAD_HOST):
        raise UserError(
            f"TFDS omniglot is not built in {builder.data_dir} and could not be downloaded "
            f"({_TFDS_DOWNLOAD_HOST} is unreachable); {hint}"
        )
    try:
        builder.download_and_prepare()
        train, test = builder.as_dataset(split=["train", "test"], shuffle_files=False)
    except Exception as error:
        # TFDS raises many unrelated types here (DNS, HTTP, checksum, file system errors).
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        raise UserError(
            f"TFDS could not download or build omniglot ({type(error).__name__}: {reason}); {hint}"
        ) from error
    alphabet_names = builder.info.features["alphabet"].names
    parts = []
    for part, dataset, split, expected in zip(
        PARTS, (train, test), ("train", "test"), expected_characters, strict=True
    ):
        values = omniglot_part_from_tfds(
            dataset,
            alphabet_names,
            expected_characters=expected,
            images_per_character=images_per_character,
            image_size=image_size,
            resample=resample,
            source=f"TFDS omniglot/{split}",
        )
        _log_counts(part, values, f"TFDS omniglot/{split}")
        parts.append(values)
    return OmniglotData(*parts)


def _can_connect(host: str, port: int = 443, timeout: float = 5.0) -> bool:
    """Whether a TCP connection to `host` opens within `timeout` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def omniglot_part_from_tfds(
    dataset: Iterable,
    alphabet_names: Sequence[str] | None = None,
    *,
    expected_characters: int | None = None,
    images_per_character: int = 20,
    image_size: int = 28,
    resample: str = "lanczos",
    source: str = "TFDS omniglot",
) -> OmniglotPart:
    """Groups TFDS Omniglot elements by character into the arrays `load_omniglot` makes.

    Args:
        dataset: a `tf.data.Dataset` (or any iterable) of dicts with `image` uint8
            `[105, 105, 3]`, `label` int64 (character), `alphabet` int64 (index into the sorted
            alphabet names) and `alphabet_char_id` int64 (0-based character number).
        alphabet_names: TFDS's alphabet names, to name characters `"Alphabet/characterNN"`;
            None names them `"alphabetAA/characterNN"` by index.
        expected_characters: characters expected, None to skip the check.
        images_per_character: images every character must have.
        image_size: side of the resized images.
        resample: `"lanczos"` or `"nearest"`, as for `load_omniglot`.
        source: names the data in error and log messages.

    Returns:
        `OmniglotPart` with uint8 `[characters, images_per_character, image_size, image_size, 1]`,
        ink 255, characters sorted by (alphabet, character number).

    Raises:
        UserError: when a label mixes characters or the counts are wrong.
    """
    if resample not in _RESAMPLE:
        raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {resample!r}")
    if hasattr(dataset, "as_numpy_iterator"):
        dataset = dataset.as_numpy_iterator()
    by_label: dict[int, tuple[tuple[int, int], list[np.ndarray]]] = {}
    for element in dataset:
        label = int(element["label"])
        key = (int(element["alphabet"]), int(element["alphabet_char_id"]))
        image = _preprocess(Image.fromarray(np.asarray(element["image"])), image_size, resample)
        seen_key, images = by_label.setdefault(label, (key, []))
        if seen_key != key:
            raise UserError(f"{source}: label {label} holds two characters, {seen_key} and {key}")
        images.append(image)

    characters = {}
    for (alphabet, char_id), images in sorted(by_label.values(), key=lambda item: item[0]):
        alphabet_name = (
            alphabet_names[alphabet] if alphabet_names is not None else f"alphabet{alphabet:02d}"
        )
        characters[f"{alphabet_name}/character{char_id + 1:02d}"] = images
    _check_counts(source, characters, expected_characters, images_per_character)
    stacked = np.stack([np.stack(images) for images in characters.values()])
    return OmniglotPart(stacked[..., None], tuple(characters))


def omniglot_splits(
    data: OmniglotData,
    split: str = "maml",
    seed: int = 1,
    *,
    num_train: int = 1100,
    num_val: int = 100,
    val_alphabets: int = 5,
    rotations: Sequence[int] | None = None,
    rotation: str = "episode",
) -> Splits:
    """Splits Omniglot's characters into meta-train, meta-validation and meta-test classes.

    `"maml"`, the split of the MAML paper's code and of learn2learn: all 1623 characters,
    background then evaluation (each in `load_omniglot` order), are permuted with
    `np.random.RandomState(seed).permutation`; the first `num_train` (1100) are meta-train,
    the next `num_val` (100) meta-validation and the remaining 423 meta-test. Alphabets are
    mixed across the three. The original code shuffled `os.listdir` order with Python's
    `random.seed(1)`, which depends on the file system, so its exact classes cannot be
    reproduced; the sizes are the same. Default rotations: (0, 90, 180, 270).

    `"lake"`, the split of Lake et al.: the 659 evaluation characters (20 alphabets never seen
    in training) are meta-test. Meta-validation is `val_alphabets` (5) whole background
    alphabets, chosen by `np.random.RandomState(seed).permutation` of the sorted alphabet
    names, so that, like the test set, it holds alphabets absent from meta-train; the other
    background alphabets are meta-train. `num_train` and `num_val` do not apply. Default
    rotations (0,): no augmentation.

    `rotation` says how the rotations augment the classes:

    - `"episode"`, as the MAML paper's code and learn2learn: the classes are the characters
      (1100 / 100 / 423), and an episode turns each of its classes by one of `rotations`,
      drawn per class and episode (`Split.episode_rotations`, applied by the sampler). An
      episode never holds two rotations of one character.
    - `"classes"`, as Santoro et al. (2016): rotating every image of a character by k*90
      degrees counter-clockwise (`np.rot90(image, k)`) gives a class of its own, in every
      split (4400 / 400 / 1692). Classes are ordered rotation-major (all characters at the
      first rotation, then all at the next) and named `"Alphabet/characterNN"` plus `"/rot90"`
      etc. for non-zero rotations. An episode may hold two rotations of one character as two
      classes; one that a rotation leaves unchanged (like "o") is then two identical classes.
    - `"none"`: every character upright, whatever the split (`rotations` must then be None or
      (0,)).

    Args:
        data: both Omniglot parts.
        split: `"maml"` or `"lake"`.
        seed: seeds the permutation above (the original code used 1).
        num_train: `"maml"` only, meta-train characters.
        num_val: `"maml"` only, meta-validation characters; the rest are meta-test.
        val_alphabets: `"lake"` only, background alphabets held out for meta-validation.
        rotations: angles in degrees, multiples of 90; None for the split's default.
        rotation: `"episode"`, `"classes"` or `"none"`, see above.

    Returns:
        `Splits` of uint8 `[classes, 20, 28, 28, 1]` images with their class names.

    Raises:
        UserError: when the sizes leave a split empty.
        ValueError: for an unknown split or `rotation`, or rotations that are not distinct
            multiples of 90.
    """
    if rotation not in ROTATIONS:
        raise ValueError(f"rotation must be one of {ROTATIONS}, got {rotation!r}")
    if split == "maml":
        images = np.concatenate([data.background.images, data.evaluation.images])
        names = data.background.names + data.evaluation.names
        if num_train < 1 or num_val < 1 or num_train + num_val >= len(names):
            raise UserError(
                f"Omniglot 'maml' split: num_train={num_train} and num_val={num_val} must be at "
                f"least 1 and leave test characters out of {len(names)}"
            )
        order = np.random.RandomState(seed).permutation(len(names))
        groups = np.split(order, [num_train, num_train + num_val])
        default_rotations = (0, 90, 180, 270)
    elif split == "lake":
        images = np.concatenate([data.background.images, data.evaluation.images])
        names = data.background.names + data.evaluation.names
        alphabets = sorted({name.split("/")[0] for name in data.background.names})
        if not 1 <= val_alphabets < len(alphabets):
            raise UserError(
                f"Omniglot 'lake' split: val_alphabets={val_alphabets} must be at least 1 and "
                f"leave training alphabets out of {len(alphabets)}"
            )
        permuted = np.random.RandomState(seed).permutation(len(alphabets))
        held_out = {alphabets[i] for i in permuted[:val_alphabets]}
        in_val = np.array([name.split("/")[0] in held_out for name in data.background.names])
        num_background = len(data.background.names)
        groups = [
            np.flatnonzero(~in_val),
            np.flatnonzero(in_val),
            np.arange(num_background, len(names)),
        ]
        default_rotations = (0,)
    else:
        raise ValueError(f"split must be 'maml' or 'lake', got {split!r}")

    if rotation == "none":
        if rotations is not None and tuple(rotations) != (0,):
            raise ValueError(f"rotation 'none' turns nothing, got rotations {tuple(rotations)}")
        default_rotations = (0,)
    rotations = check_rotations(default_rotations if rotations is None else rotations)
    if rotation != "classes":
        splits = Splits(
            *(
                make_split(images[indices], [names[i] for i in indices], None, rotations)
                for indices in groups
            )
        )
    else:
        splits = Splits(*(_rotated(images, names, indices, rotations) for indices in groups))
    if rotations == (0,):
        augmented = "upright, no rotations"
    elif rotation == "classes":
        augmented = f"rotations {rotations} as classes"
    else:
        augmented = f"rotations {rotations} drawn per class and episode"
    for split_name, values in zip(Splits._fields, splits, strict=True):
        logging.info(
            "Omniglot %r split, meta-%s: %d classes, %s",
            split,
            split_name,
            len(values.names),
            augmented,
        )
    return splits


def _rotated(images, names, indices, rotations) -> Split:
    """The characters at `indices`, once per rotation, as one `Split`."""
    chosen = images[indices]
    # Axes (2, 3) are height and width of [characters, images, H, W, C].
    stacked = np.concatenate([np.rot90(chosen, angle // 90, axes=(2, 3)) for angle in rotations])
    rotated_names = [
        names[i] + ("" if angle % 360 == 0 else f"/rot{angle % 360}")
        for angle in rotations
        for i in indices
    ]
    return make_split(np.ascontiguousarray(stacked), rotated_names)


class _Source(NamedTuple):
    """Where one part is read from."""

    path: pathlib.Path
    is_zip: bool


def _find_source(data_dir: pathlib.Path, part: str) -> _Source:
    zip_path = data_dir / f"images_{part}.zip"
    folder = data_dir / f"images_{part}"
    if zip_path.is_file():
        return _Source(zip_path, True)
    if folder.is_dir():
        # Unzipping into a folder of the zip's name nests the top folder once more.
        if (folder / folder.name).is_dir():
            folder = folder / folder.name
        return _Source(folder, False)
    raise UserError(
        f"--data_dir={data_dir}: images_{part}.zip is missing (and no extracted "
        f"images_{part}/ folder either)"
    )


def _list_source(
    source: _Source, part: str, stack: contextlib.ExitStack
) -> tuple[dict[str, list[str]], Callable[[str], bytes]]:
    """Lists a part's characters and their PNGs.

    Args:
        source: the zip or folder.
        part: `"background"` or `"evaluation"`.
        stack: closes the zip file when the caller is done reading.

    Returns:
        `{"Alphabet/characterNN": [member, ...]}` sorted by character, members sorted by file
        name, and a function reading a member's bytes.
    """
    if source.is_zip:
        try:
            archive = stack.enter_context(zipfile.ZipFile(source.path))
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            raise UserError(
                f"{source.path}: not a readable zip file, truncated or corrupted? ({error})"
            ) from error
        entries = [(name, name.endswith("/")) for name in archive.namelist()]
        read = archive.read
    else:
        root = source.path
        entries = [(path.relative_to(root).as_posix(), path.is_dir()) for path in root.rglob("*")]

        def read(member):
            return (root / member).read_bytes()

    top = f"images_{part}"
    characters: dict[str, list[str]] = {}
    alphabets: set[str] = set()
    for member, is_dir in entries:
        parts = member.rstrip("/").split("/")
        if any(piece.startswith((".", "__MACOSX")) for piece in parts):
            continue
        if parts[0] == top:
            parts = parts[1:]
        if is_dir:
            if len(parts) == 1:
                alphabets.add(parts[0])
            elif len(parts) == 2:
                characters.setdefault("/".join(parts), [])
            continue
        if not parts[-1].lower().endswith(".png"):
            continue
        if len(parts) != 3:
            raise UserError(
                f"{source.path}: {member!r} is not laid out as {top}/ALPHABET/CHARACTER/NAME.png"
            )
        characters.setdefault("/".join(parts[:2]), []).append(member)

    alphabets -= {name.split("/")[0] for name in characters}
    if alphabets:
        raise UserError(f"{source.path}: alphabet folder {sorted(alphabets)[0]!r} is empty")
    listing = {}
    for name in sorted(characters):
        members = sorted(characters[name], key=lambda member: member.rsplit("/", 1)[-1])
        if not members:
            raise UserError(f"{source.path}: character folder {name!r} holds no PNG images")
        listing[name] = members
    return listing, read


def _check_counts(where: str, characters: dict[str, list], expected, images_per_character):
    """Raises UserError for a character without `images_per_character` images or a wrong total."""
    if not characters:
        raise UserError(f"{where}: no characters found (expected ALPHABET/characterNN/*.png)")
    for name, images in characters.items():
        if len(images) != images_per_character:
            raise UserError(
                f"{where}: character {name!r} has {len(images)} images, expected "
                f"{images_per_character}"
            )
    if expected is not None and len(characters) != expected:
        raise UserError(f"{where}: found {len(characters)} characters, expected {expected}")


def _check_part_shape(source, values: OmniglotPart, expected, images_per_character) -> None:
    """`_check_counts` for arrays read from the cache."""
    characters, per_character = values.images.shape[:2]
    if per_character != images_per_character or (expected is not None and characters != expected):
        raise UserError(
            f"{source.path}: found {characters} characters of {per_character} images, expected "
            f"{expected} of {images_per_character}"
        )


def _decode_characters(source, characters, read, image_size, resample) -> np.ndarray:
    """Decodes every listed PNG into uint8 `[characters, images, size, size, 1]`, ink 255."""
    per_character = len(next(iter(characters.values())))
    images = np.empty([len(characters), per_character, image_size, image_size, 1], np.uint8)
    for i, members in enumerate(characters.values()):
        for j, member in enumerate(members):
            try:
                with Image.open(io.BytesIO(read(member))) as image:
                    images[i, j, ..., 0] = _preprocess(image, image_size, resample)
            except _READ_ERRORS as error:
                raise UserError(
                    f"{source.path}: cannot read image {member!r} ({type(error).__name__}: "
                    f"{str(error).splitlines()[0] if str(error) else ''})"
                ) from error
    return images


def _preprocess(image: Image.Image, image_size: int, resample: str) -> np.ndarray:
    """Grayscale, resize, invert: uint8 `[image_size, image_size]`, ink 255."""
    gray = image.convert("L")
    if gray.size != (image_size, image_size):
        gray = gray.resize((image_size, image_size), resample=_RESAMPLE[resample])
    return 255 - np.asarray(gray, np.uint8)


def _log_counts(part: str, values: OmniglotPart, origin: str) -> None:
    characters, per_character = values.images.shape[:2]
    logging.info(
        "%s: %d characters, %d images (%s)",
        part,
        characters,
        characters * per_character,
        origin,
    )


def _cache_key(sources: Sequence[_Source], image_size: int, resample: str) -> str:
    """A hash of the source files' names and contents and of the preprocessing.

    Contents, not sizes and modification times: the same files copied or re-created elsewhere
    (new modification times) hit the same cache, and a rewritten file never does. Hashing the
    two official zips (14 MB) takes tens of milliseconds; decoding them takes seconds.
    """
    digest = hashlib.sha256(f"v{_CACHE_VERSION} {image_size} {resample}".encode())
    for source in sources:
        files = [source.path] if source.is_zip else sorted(source.path.rglob("*"))
        for path in files:
            if not path.is_file():
                continue
            name = path.name if source.is_zip else path.relative_to(source.path).as_posix()
            with open(path, "rb") as file:
                content = hashlib.file_digest(file, "sha256").hexdigest()
            digest.update(f"{name}:{content};".encode())
    return digest.hexdigest()[:16]


def _read_cache(path: pathlib.Path) -> OmniglotData | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            return OmniglotData(
                *(
                    OmniglotPart(
                        archive[part], tuple(str(name) for name in archive[f"{part}_names"])
                    )
                    for part in PARTS
                )
            )
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as error:
        logging.warning("Ignoring the unreadable Omniglot cache %s (%s)", path, error)
        return None


def _write_cache(path: pathlib.Path, data: OmniglotData) -> None:
    arrays = {}
    for part, values in zip(PARTS, data, strict=True):
        arrays[part] = values.images
        arrays[f"{part}_names"] = np.array(values.names)
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written aside and renamed, so a crash or a parallel run never leaves half a cache.
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as file:
            temporary = pathlib.Path(file.name)
            np.savez(file, **arrays)
        os.replace(temporary, path)
    except OSError as error:
        logging.warning("Could not write the Omniglot cache %s (%s)", path, error)
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        return
    logging.info("Omniglot: decoded arrays cached in %s", path)
