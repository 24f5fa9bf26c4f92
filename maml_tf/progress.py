"""How far a training run has got, read from what it wrote: its saves and its validation logs.

`python -m maml_tf.progress MODEL_DIR` prints, for each kept save, the meta-updates done and the
accumulated training time (`train_seconds`, the wall time spent in `fit`, across resumes), the
seconds per meta-update between consecutive saves, the best save, and every validation. A long
run's figures are then read off rather than copied by hand from its log.

A run keeps only its last `--keep_checkpoints` saves (`maml_tf.checkpoints.TrainingState`), so
the speed between older saves is gone with them: read a running job's progress as it goes.
"""

import glob
import os
import sys

if __name__ == "__main__":
    # Run as a command, as main.py: fewer of TensorFlow's C++ start-up lines.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from maml_tf import checkpoints, plots  # noqa: E402
from maml_tf.errors import UserError, run_command  # noqa: E402


def report(model_dir):
    """The progress of the run in `model_dir` as text, one table per learner it saved.

    Raises:
      UserError: the directory holds no saves.
    """
    names = sorted(
        os.path.basename(os.path.dirname(latest))
        for latest in glob.glob(
            os.path.join(os.fspath(model_dir), checkpoints.CHECKPOINT_DIR, "*", checkpoints.LATEST)
        )
    )
    lines = []
    for name in names:
        directory = os.path.join(os.fspath(model_dir), checkpoints.CHECKPOINT_DIR, name)
        saves = checkpoints.read_saves(os.path.join(directory, checkpoints.LATEST))
        if not saves:
            continue
        lines.append(f"{name}: saves in {os.path.join(directory, checkpoints.LATEST)}")
        lines.append("  meta-updates  train_seconds   hours  s/meta-update since the save before")
        previous = None
        for save in saves:
            speed = ""
            if previous is not None:
                seconds = save.train_seconds - previous.train_seconds
                speed = f"{seconds / (save.meta_updates - previous.meta_updates):.2f}"
            lines.append(
                f"  {save.meta_updates:12,d}  {save.train_seconds:13,.1f}  "
                f"{save.train_seconds / 3600:6.2f}  {speed}".rstrip()
            )
            previous = save
        for best in checkpoints.read_saves(os.path.join(directory, checkpoints.BEST)):
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
