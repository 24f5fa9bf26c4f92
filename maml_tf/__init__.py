"""maml_tf: Model-Agnostic Meta-Learning in TensorFlow 2 and Keras 3.

    from maml_tf import MAML, learners, pretrained
    model = MAML(learners.mlp(), inner_lr=0.01, inner_steps=1, loss="mse")
    shipped = pretrained.load("pretrained/omniglot_5w1s")   # a meta-trained θ from the repository

TensorFlow is imported on first use of `MAML`, `learners` or `pretrained`, so `maml_tf.config`
(and the command line's flag parsing, which reports bad flags) stays quick.
"""

import importlib

__all__ = ["MAML", "TaskResults", "learners", "pretrained"]
__version__ = "0.1.0"


def __getattr__(name):
    if name in ("MAML", "TaskResults"):
        return getattr(importlib.import_module("maml_tf.maml"), name)
    if name in ("learners", "pretrained"):
        return importlib.import_module(f"maml_tf.{name}")
    raise AttributeError(f"module 'maml_tf' has no attribute {name!r}")
