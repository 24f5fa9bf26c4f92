"""Tiny Omniglot files in the official layout, for tests that must not need the real data.

`omniglot_members` returns `{member path: PNG bytes}` for one part, so a test can drop or damage
members before `write_zip` or `write_folder` puts them on disk; `write_omniglot` writes both
parts at once. Images are random one-bit 105x105 PNGs, as in the official release, so every
image is different from every other.
"""

import io
import pathlib
import zipfile

import numpy as np
from PIL import Image

PARTS = ("background", "evaluation")
IMAGE_SIDE = 105


def alphabet_names(part: str, alphabets: int) -> list[str]:
    """Alphabet folder names of a part, distinct across parts, e.g. `"Background_Alphabet_1"`."""
    return [f"{part.capitalize()}_Alphabet_{a}" for a in range(alphabets)]


def png_bytes(pixels: np.ndarray) -> bytes:
    """PNG bytes of a bool `[H, W]` (one-bit, True white) or uint8 `[H, W]` (grayscale) image."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def omniglot_members(
    part: str,
    alphabets: int = 2,
    characters: int = 3,
    images: int = 20,
    seed: int = 0,
    image_side: int = IMAGE_SIDE,
) -> dict[str, bytes]:
    """PNG members of one part: `images_<part>/Alphabet/characterNN/XXXX_YY.png`.

    Args:
        part: `"background"` or `"evaluation"`.
        alphabets: alphabets in the part.
        characters: characters per alphabet.
        images: images per character (drawers).
        seed: seeds the random pixels; parts get different images whatever the seed.
        image_side: side of the square images (105 as the official ones; smaller is quicker).

    Returns:
        `{member path: PNG bytes}` in sorted order; XXXX is a global 1-based character id,
        evaluation ids following background ids, as in the official files.
    """
    rng = np.random.RandomState([seed, PARTS.index(part)])
    first_id = 1 + PARTS.index(part) * 1000
    members = {}
    for a, alphabet in enumerate(alphabet_names(part, alphabets)):
        for c in range(characters):
            global_id = first_id + a * characters + c
            for drawer in range(1, images + 1):
                # Mostly white paper (True) with black ink, like the official images.
                pixels = rng.uniform(size=[image_side, image_side]) > 0.2
                folder = f"images_{part}/{alphabet}/character{c + 1:02d}"
                members[f"{folder}/{global_id:04d}_{drawer:02d}.png"] = png_bytes(pixels)
    return members


def write_zip(path: pathlib.Path, members: dict[str, bytes]) -> pathlib.Path:
    """Writes `members` into a zip at `path`, with folder entries as the official zips have."""
    folders = sorted({name.rsplit("/", i)[0] + "/" for name in members for i in (1, 2, 3)})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for folder in folders:
            archive.writestr(folder, b"")
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def write_folder(root: pathlib.Path, members: dict[str, bytes]) -> pathlib.Path:
    """Writes `members` as files below `root`, as unzipping into `root` would."""
    for name, data in members.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def write_omniglot(
    data_dir: pathlib.Path,
    form: str = "zip",
    alphabets: int = 2,
    characters: int = 3,
    images: int = 20,
    seed: int = 0,
    characters_per_part: tuple[int, int] | None = None,
    image_side: int = IMAGE_SIDE,
) -> tuple[int, int]:
    """Writes both parts into `data_dir` as zips (`form="zip"`) or extracted folders.

    `characters_per_part=(964, 659)` writes the official counts (one alphabet per part, small
    images), so the loader's real count checks pass: a whole Omniglot in a few seconds.

    Returns:
        The number of characters per part, to pass as `expected_characters`.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    counts = []
    for p, part in enumerate(PARTS):
        if characters_per_part is not None:
            alphabets, characters = 1, characters_per_part[p]
        counts.append(alphabets * characters)
        members = omniglot_members(part, alphabets, characters, images, seed, image_side)
        if form == "zip":
            write_zip(data_dir / f"images_{part}.zip", members)
        else:
            write_folder(data_dir, members)
    return tuple(counts)
