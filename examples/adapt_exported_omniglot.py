"""Adapt an exported 5-way 1-shot Omniglot model to five new characters, with TensorFlow only.

    python examples/adapt_exported_omniglot.py EXPORT_DIR DATA_DIR/images_evaluation.zip \
        Tengwar/character03 Tengwar/character05 Tengwar/character08 Tengwar/character09 \
        Tengwar/character18

The five characters (ALPHABET/characterNN) are the task's classes, labelled 0..4 in that order.

No maml_tf import: this is what a program or a server that received the export can do.
"""

import sys
import zipfile

import numpy as np
import tensorflow as tf
from PIL import Image

export_dir, zip_path, names = sys.argv[1], sys.argv[2], sys.argv[3:]
archive = zipfile.ZipFile(zip_path)
top = archive.namelist()[0].split("/", 1)[0]  # images_evaluation
characters = [f"{top}/{name}" for name in names]


def image(name):  # as training saw them: grayscale, 28x28 (Lanczos), ink 1.0
    gray = Image.open(archive.open(name)).convert("L").resize((28, 28), Image.Resampling.LANCZOS)
    return (255 - np.asarray(gray, np.float32)) / 255.0


files = [
    sorted(n for n in archive.namelist() if n.startswith(c + "/") and n.endswith(".png"))
    for c in characters
]
support_x = np.stack([image(f[0]) for f in files])[..., None]  # 1 shot: [N, 28, 28, 1]
support_y = np.arange(len(files), dtype=np.int32)
query_x = np.stack([image(name) for f in files for name in f[1:]])[..., None]  # [N*19, ...]
query_y = np.repeat(np.arange(len(files)), [len(f) - 1 for f in files])

model = tf.saved_model.load(export_dir)
out = model.signatures["adapt_and_predict"](
    support_x=tf.constant(support_x), support_y=tf.constant(support_y), query_x=tf.constant(query_x)
)
before = model.signatures["serve"](x=tf.constant(query_x))
adapted = np.mean(out["labels"].numpy() == query_y)
unadapted = np.mean(before["labels"].numpy() == query_y)
print(f"accuracy on {len(query_y)} queries without adaptation: {unadapted:.3f}")
print(f"accuracy on {len(query_y)} queries after adapt_and_predict: {adapted:.3f}")
print("maml_tf imported:", any(m.startswith("maml_tf") for m in sys.modules))
