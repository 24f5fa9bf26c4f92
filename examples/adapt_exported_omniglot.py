"""Adapt an exported 5-way 1-shot Omniglot model to five new characters, with TensorFlow only.

    python examples/adapt_exported_omniglot.py EXPORT_DIR DATA_DIR/images_evaluation.zip

No maml_tf import: this is what a program or a server that received the export can do.
"""

import sys
import zipfile

import numpy as np
import tensorflow as tf
from PIL import Image

export_dir, zip_path = sys.argv[1], sys.argv[2]
archive = zipfile.ZipFile(zip_path)
characters = sorted(
    {n.rsplit("/", 1)[0] for n in archive.namelist() if n.endswith(".png") and "Tengwar" in n}
)[:5]


def image(name):  # as training saw them: grayscale, 28x28 (Lanczos), ink 1.0
    gray = Image.open(archive.open(name)).convert("L").resize((28, 28), Image.Resampling.LANCZOS)
    return (255 - np.asarray(gray, np.float32)) / 255.0


files = [
    sorted(n for n in archive.namelist() if n.startswith(c + "/") and n.endswith(".png"))
    for c in characters
]
support_x = np.stack([image(f[0]) for f in files])[..., None]  # 1 shot: [5, 28, 28, 1]
support_y = np.arange(5, dtype=np.int32)
query_x = np.stack([image(name) for f in files for name in f[1:]])[..., None]  # [95, 28, 28, 1]
query_y = np.repeat(np.arange(5), 19)

model = tf.saved_model.load(export_dir)
out = model.signatures["adapt_and_predict"](
    support_x=tf.constant(support_x), support_y=tf.constant(support_y), query_x=tf.constant(query_x)
)
before = model.signatures["serve"](x=tf.constant(query_x))
adapted = np.mean(out["labels"].numpy() == query_y)
unadapted = np.mean(before["labels"].numpy() == query_y)
print("characters:", [c.split("/", 1)[1] for c in characters])
print(f"accuracy on 95 queries without adaptation: {unadapted:.3f}")
print(f"accuracy on 95 queries after adapt_and_predict: {adapted:.3f}")
print("maml_tf imported:", any(m.startswith("maml_tf") for m in sys.modules))
