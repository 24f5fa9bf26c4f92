"""A tiny miniImageNet-layout directory and the flags of a seconds-long run on it."""

import numpy as np
from PIL import Image

# Later occurrences of a flag override these (absl keeps the last), so tests append changes.
TINY_FOLDER_RUN = (
    "--dataset=folder",
    "--image_size=16",
    "--n_way=2",
    "--k_shot=1",
    "--n_query=1",
    "--filters=4",
    "--meta_batch_size=2",
    "--train_steps=2",
    "--steps_per_epoch=2",
    "--val_tasks=2",
    "--test_tasks=2",
    "--eval_inner_steps=1",
    "--verbose=0",
)


def write_folder_dataset(root, classes=3, images=4, side=20):
    """`root/{train,val,test}/CLASS/I.jpg` of random RGB pixels; returns `root`."""
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for c in range(classes):
            folder = root / split / f"n{split}{c:03d}"
            folder.mkdir(parents=True)
            for i in range(images):
                pixels = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg")
    return root
