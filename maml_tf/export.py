"""A SavedModel of a meta-trained MAML model, for TensorFlow Serving or any TensorFlow program.

The export holds θ (the meta-learned initialisation) and two signatures:

- `serve` (also `serving_default`): f_θ, the forward pass at θ without adaptation.
    inputs:  `x` float32 [n, *input_shape]
    outputs: classification: `logits` [n, n_way], `probabilities` [n, n_way] (softmax),
             `labels` int32 [n] (argmax); regression: `values` [n, *output_shape].
- `adapt_and_predict`: the meta-test procedure of Finn et al. (2017) for one task, in the graph:
  `eval_inner_steps` SGD steps of size α on the support set, θ' = θ − α ∇_θ L_support(f_θ),
  then f_θ' on the query set.
    inputs:  `support_x` float32 [n_support, *input_shape],
             `support_y` int32 [n_support] (labels in [0, n_way)) for classification,
               float32 [n_support, *output_shape] for regression,
             `query_x` float32 [n_query, *input_shape].
    outputs: as `serve`, for the query set: [n_query, ...].

Float outputs come in the learner's dtype (float32 unless it was built otherwise).

n_support and n_query are free: any shot count works with the same export. For classification
the number of ways is the trained head's (a task with fewer classes uses labels 0..N'−1 and gets
probabilities over all n_way outputs, so its labels may name an unused class). The export needs
only TensorFlow to load: no maml_tf code.

The learners of `maml_tf.learners` normalise with the statistics of the batch they are given (as
the original MAML code did), so a prediction depends on the other examples of its request: send a
task's whole query set in one request, and leave TensorFlow Serving's request batching off.

    export_model(model, "exports/omniglot")
    loaded = tf.saved_model.load("exports/omniglot")
    out = loaded.signatures["adapt_and_predict"](
        support_x=support_x, support_y=support_y, query_x=query_x)
    out["labels"]  # int32 [n_query]
"""

import collections
import contextlib
import json
import logging as std_logging
import os
import shutil
import tempfile
import uuid

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from maml_tf.errors import UserError

SERVE = "serve"
ADAPT_AND_PREDICT = "adapt_and_predict"
SIGNATURE_INPUTS = {
    SERVE: ("x",),
    ADAPT_AND_PREDICT: ("support_x", "support_y", "query_x"),
}
CLASSIFICATION_OUTPUTS = ("logits", "probabilities", "labels")
REGRESSION_OUTPUTS = ("values",)
# Written next to the SavedModel (TensorFlow Serving ignores assets.extra/): what the
# signatures do, for whoever finds the export without its training run.
METADATA = os.path.join("assets.extra", "maml_tf.json")

Export = collections.namedtuple(
    "Export", ["path", "input_shape", "n_way", "inner_lr", "inner_steps", "outputs"]
)
Export.__doc__ = """What `export_model` wrote.

Attributes:
  path: the export directory (absolute).
  input_shape: tuple, the shape of one example (without the batch dimension).
  n_way: classes of the classification head, or None for regression.
  inner_lr: α, step size of the inner SGD steps in `adapt_and_predict`.
  inner_steps: SGD steps `adapt_and_predict` takes (the model's `eval_inner_steps`).
  outputs: tuple of the output names of both signatures.
"""


def _input_shape(model, input_shape):
    if input_shape is not None:
        return tuple(int(d) for d in input_shape)
    try:
        shape = model.learner.input_shape
    except (AttributeError, ValueError):
        shape = None
    if not isinstance(shape, tuple) or any(d is None for d in shape[1:]):
        raise ValueError(
            "The learner has no single input with a known shape: pass input_shape, the shape "
            "of one example, e.g. (28, 28, 1)."
        )
    return tuple(shape[1:])


def _outputs(model, outputs):
    """The named outputs of both signatures, from the learner's outputs [n, ...]."""
    if not model.classification:
        return {"values": outputs}
    return {
        "logits": outputs,
        "probabilities": tf.nn.softmax(outputs, axis=-1),
        "labels": tf.argmax(outputs, axis=-1, output_type=tf.int32),
    }


def _archive(model, input_shape, target_shape, n_way):
    """An `ExportArchive` holding θ with the `serve` and `adapt_and_predict` endpoints."""

    def examples(name):
        return tf.TensorSpec([None, *input_shape], tf.float32, name=name)

    if model.classification:
        support_y = tf.TensorSpec([None], tf.int32, name="support_y")
    else:
        support_y = tf.TensorSpec([None, *target_shape], tf.float32, name="support_y")

    def serve(x):
        return _outputs(model, model.forward(model.theta(), x))

    def adapt_and_predict(support_x, support_y, query_x):
        if model.classification:
            # Out-of-range labels would otherwise give NaNs on some devices.
            checks = [
                tf.debugging.assert_non_negative(
                    support_y, message="adapt_and_predict: support_y must be >= 0"
                ),
                tf.debugging.assert_less(
                    support_y,
                    tf.constant(n_way, tf.int32),
                    message=f"adapt_and_predict: support_y must be < n_way = {n_way}",
                ),
            ]
            with tf.control_dependencies(checks):
                support_y = tf.identity(support_y)
        fast_weights = model.adapt(support_x, support_y, steps=model.eval_inner_steps)
        return _outputs(model, model.forward(fast_weights, query_x))

    archive = keras.export.ExportArchive()
    archive.track(model.learner)
    # The first endpoint is also exported as `serving_default`.
    archive.add_endpoint(SERVE, serve, input_signature=[examples("x")])
    archive.add_endpoint(
        ADAPT_AND_PREDICT,
        adapt_and_predict,
        input_signature=[examples("support_x"), support_y, examples("query_x")],
    )
    return archive


@contextlib.contextmanager
def _keeping_absl_logger_level():
    """Puts back the `absl` logger's own level, which `tf.saved_model.save` pins.

    TensorFlow 2.21's `AutoTrackable._trackable_children` silences absl while it saves and then
    sets the level it read back: the effective level, inherited from the root logger until then,
    becomes the absl logger's own. A process that later lowers the root logger's level (a
    notebook's `logging.basicConfig(level=logging.INFO)`, pytest's `caplog`) would no longer see
    the library's INFO lines.
    """
    logger = std_logging.getLogger("absl")
    level = logger.level
    try:
        yield
    finally:
        logger.setLevel(level)


def _check_destination(export_dir, overwrite):
    if os.path.exists(export_dir) and not overwrite:
        raise UserError(
            f"--export_dir={export_dir} already exists; choose another directory or add --overwrite"
        )
    if os.path.exists(export_dir) and not os.path.isdir(export_dir):
        raise UserError(f"--export_dir={export_dir} is a file, not a directory")


def _move_into_place(staging, export_dir, parent):
    """Renames `staging` to `export_dir`, replacing an existing one; never leaves a partial one.

    An existing export is first moved into a fresh `.NAME.old-*` sibling, so a crash between the
    two renames leaves it whole there (and no `export_dir`).
    """
    if not os.path.exists(export_dir):
        os.rename(staging, export_dir)
        return
    trash = tempfile.mkdtemp(prefix=f".{os.path.basename(export_dir)}.old-", dir=parent)
    previous = os.path.join(trash, "previous")
    os.rename(export_dir, previous)
    try:
        os.rename(staging, export_dir)
    except BaseException:
        os.rename(previous, export_dir)
        raise
    shutil.rmtree(trash, ignore_errors=True)


def export_model(model, export_dir, input_shape=None, overwrite=False):
    """Writes a SavedModel with the `serve` and `adapt_and_predict` signatures (module docstring).

    The export is written to a temporary sibling directory and renamed to `export_dir` when
    complete, so an interrupted export leaves either no `export_dir` or the previous one.
    Local file systems only (the rename is what makes it atomic).

    Args:
      model: a `maml_tf.MAML` with its learner's weights θ loaded. `adapt_and_predict` takes
        `model.eval_inner_steps` SGD steps of size α = `model.inner_lr`, with `model`'s loss.
      export_dir: where the SavedModel goes; its parent is created if missing.
      input_shape: the shape of one example, e.g. (28, 28, 1) or (1,) (default: the learner's
        input shape, when it has a single input with a known shape).
      overwrite: replace an existing `export_dir`.

    Returns:
      `Export`.

    Raises:
      UserError: `export_dir` exists and `overwrite` is False, or it is a file; the export
        cannot be written (a full disk): nothing is left of it, a previous export stays.
      ValueError: no `input_shape` given and the learner has none; a classifier whose outputs
        are not logits [n, n_way].
    """
    export_dir = os.path.abspath(export_dir)
    _check_destination(export_dir, overwrite)
    input_shape = _input_shape(model, input_shape)
    # One forward pass tells the output shape, whatever kind of Keras model the learner is.
    probe = model.forward(model.theta(), tf.zeros([2, *input_shape]))
    target_shape = tuple(probe.shape[1:])
    n_way = None
    if model.classification:
        if len(target_shape) != 1:
            raise ValueError(f"a classifier must output logits [n, n_way], got [n, {target_shape}]")
        n_way = int(target_shape[0])
    outputs = CLASSIFICATION_OUTPUTS if model.classification else REGRESSION_OUTPUTS
    archive = _archive(model, input_shape, target_shape, n_way)

    parent = os.path.dirname(export_dir)
    os.makedirs(parent, exist_ok=True)
    # Not tempfile.mkdtemp: its mode 0700 would keep a server running as another user out.
    staging = os.path.join(parent, f".{os.path.basename(export_dir)}.tmp-{uuid.uuid4().hex}")
    os.mkdir(staging)
    try:
        with _keeping_absl_logger_level():
            archive.write_out(staging, verbose=False)
        metadata = {
            "algorithm": "MAML (Finn, Abbeel and Levine, 2017)",
            "task": "classification" if model.classification else "regression",
            "input_shape": list(input_shape),
            "n_way": n_way,
            "target_shape": None if model.classification else list(target_shape),
            "inner_lr": model.inner_lr,
            "inner_steps": model.eval_inner_steps,
            "loss": model.loss_name,
            "signatures": {
                name: {"inputs": list(inputs), "outputs": list(outputs)}
                for name, inputs in SIGNATURE_INPUTS.items()
            },
        }
        os.makedirs(os.path.join(staging, os.path.dirname(METADATA)), exist_ok=True)
        with open(os.path.join(staging, METADATA), "w") as f:
            json.dump(metadata, f, indent=2)
        _move_into_place(staging, export_dir, parent)
    except (OSError, tf.errors.OpError) as error:
        shutil.rmtree(staging, ignore_errors=True)
        reason = getattr(error, "strerror", None) or str(error).strip().split("; ")[-1]
        raise UserError(f"{export_dir}: cannot write the export ({reason})") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logging.info(
        "exported to %s: signatures %s and %s (%d steps of α=%g)",
        export_dir,
        SERVE,
        ADAPT_AND_PREDICT,
        model.eval_inner_steps,
        model.inner_lr,
    )
    return Export(export_dir, input_shape, n_way, model.inner_lr, model.eval_inner_steps, outputs)


def rest_request(signature_name, **inputs):
    """The JSON body of a TensorFlow Serving REST predict request, in the columnar format.

    Send it with `POST http://HOST:8501/v1/models/MODEL_NAME:predict`; the answer is
    `{"outputs": {"labels": [...], "probabilities": [[...], ...], ...}}` for a classifier, and
    `{"outputs": [[...], ...]}` (the one output, `values`, unnamed) for regression.

    Args:
      signature_name: "serve" or "adapt_and_predict".
      **inputs: the signature's inputs as arrays (module docstring), e.g.
        `rest_request("adapt_and_predict", support_x=sx, support_y=sy, query_x=qx)`.

    Returns:
      str, the JSON text.

    Raises:
      ValueError: unknown signature, or missing or unknown inputs.
    """
    if signature_name not in SIGNATURE_INPUTS:
        raise ValueError(
            f"signature_name must be one of {sorted(SIGNATURE_INPUTS)}, got {signature_name!r}"
        )
    expected = set(SIGNATURE_INPUTS[signature_name])
    if set(inputs) != expected:
        raise ValueError(f"{signature_name} takes inputs {sorted(expected)}, got {sorted(inputs)}")
    return json.dumps(
        {
            "signature_name": signature_name,
            "inputs": {name: np.asarray(value).tolist() for name, value in inputs.items()},
        }
    )
