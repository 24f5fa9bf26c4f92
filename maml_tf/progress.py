"""How far a training run has got, read from what it wrote: its saves and its validation logs.

`python -m maml_tf.progress MODEL_DIR` prints, for each kept save, the meta-updates done and the
accumulated training time (`train_seconds`, the wall time spent in `fit`, across resumes), the
seconds per meta-update between consecutive saves, the best save, and every validation. A long
run's figures are then read off rather than copied by hand from its log.

A run keeps only its last `--keep_checkpoints` saves (`maml_tf.checkpoints.TrainingState`), so
the speed between older saves is gone with them: read a running job's progress as it goes.
"""

import collections
import glob
import os
import sys

if __name__ == "__main__":
    # Run as a command, as main.py: fewer of TensorFlow's C++ start-up lines.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from maml_tf import checkpoints, plots  # noqa: E402
from maml_tf.errors import UserError, run_command  # noqa: E402

Save = collections.namedtuple("Save", ["meta_updates", "train_seconds", "best_score", "path"])
Save.__doc__ = """One save of a run's `TrainingState`.

Fields:
  meta_updates: int, the optimizer's iteration count when it was saved.
  train_seconds: float, wall time spent training up to it.
  best_score: float, the best validation score up to it (NaN before the first validation).
  path: the save's path prefix.
"""


def _value(reader, name):
    return reader.get_tensor(f"{name}/.ATTRIBUTES/VARIABLE_VALUE")


def read_saves(directory):
    """The saves a `tf.train.CheckpointManager` directory keeps, oldest first.

    Args:
      directory: `MODEL_DIR/checkpoints/<name>/latest` or `.../best`.

    Returns:
      A list of `Save`, empty when the directory has none.

    Raises:
      UserError: a save the index names cannot be read.
    """
    state = tf.train.get_checkpoint_state(os.fspath(directory))
    if state is None:
        return []
    saves = []
    # The index names them relative to `directory` and `get_checkpoint_state` joins the two.
    for path in state.all_model_checkpoint_paths:
        try:
            reader = tf.train.load_checkpoint(path)
            save = Save(
                int(_value(reader, "optimizer/_iterations")),
                float(_value(reader, "train_seconds")),
                float(_value(reader, "best_score")),
                path,
            )
        except (tf.errors.OpError, ValueError) as error:
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise UserError(f"{path}: cannot read this save ({message})") from None
        saves.append(save)
    return sorted(saves, key=lambda save: save.meta_updates)


def report(model_dir):
    """The progress of the run in `model_dir` as text, one table per learner it saved.

    Raises:
      UserError: the directory holds no saves.
    """
    names = sorted(
        os.path.basename(os.path.dirname(latest))
        for latest in glob.glob(
            os.path.join(os.fspath(model_dir), checkpoints.CHECKPOINT_DIR, "*", "latest")
        )
    )
    lines = []
    for name in names:
        directory = os.path.join(os.fspath(model_dir), checkpoints.CHECKPOINT_DIR, name)
        saves = read_saves(os.path.join(directory, "latest"))
        if not saves:
            continue
        lines.append(f"{name}: saves in {os.path.join(directory, 'latest')}")
        lines.append("  meta-updates  train_seconds   hours  s/meta-update since the save before")
        previous = None
        for save in saves:
            speed = ""
            if previous is not None and save.meta_updates > previous.meta_updates:
                seconds = save.train_seconds - previous.train_seconds
                speed = f"{seconds / (save.meta_updates - previous.meta_updates):.2f}"
            lines.append(
                f"  {save.meta_updates:12,d}  {save.train_seconds:13,.1f}  "
                f"{save.train_seconds / 3600:6.2f}  {speed}".rstrip()
            )
            previous = save
        for best in read_saves(os.path.join(directory, "best")):
            lines.append(
                f"  best: {best.meta_updates:,d} meta-updates, validation score "
                f"{best.best_score:.4f}, {best.train_seconds:,.1f} s"
            )
    if not lines:
        raise UserError(f"{model_dir}: no saves under {checkpoints.CHECKPOINT_DIR}/*/latest")
    iterations, values = plots.read_validation_curve(model_dir)
    lines.append(f"validation ({plots.VALIDATION_ACCURACY_TAG}):")
    if not len(iterations):
        lines.append("  none logged")
    for iteration, value in zip(iterations, values, strict=True):
        lines.append(f"  {iteration:12,d}  {100 * value:.2f}%")
    return "\n".join(lines)


def main(argv):
    """`python -m maml_tf.progress MODEL_DIR`: a run's saves, speed and validations."""
    return run_command(
        argv,
        "python -m maml_tf.progress MODEL_DIR",
        lambda args: len(args) == 1,
        lambda model_dir: print(report(model_dir)),
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv))
