"""Figures: the paper's Figure 2 for sinusoid regression; validation curves of training runs."""

import glob
import os
import sys

if __name__ == "__main__":
    # Run as a command, as main.py: fewer of TensorFlow's C++ start-up lines. TF 2.21 prints
    # the ones logged before absl::InitializeLog whatever the level, so the error is the last line.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from maml_tf.data import sinusoid  # noqa: E402
from maml_tf.errors import UserError, run_command  # noqa: E402

# What Keras' TensorBoard callback logs after each validation, at the optimizer's iteration count.
VALIDATION_ACCURACY_TAG = "evaluation_query_accuracy_vs_iterations"
VALIDATION_LOSS_TAG = "evaluation_query_loss_vs_iterations"

# A run's TensorBoard logs are in MODEL_DIR/LOG_DIR. Keras' TensorBoard callback writes its
# training and validation epochs to these runs inside them (keras/src/callbacks/tensorboard.py).
LOG_DIR = "logs"
TRAIN_RUN = "train"
VALIDATION_RUN = "validation"


def sinusoid_fit(path, task, panels, steps=(0, 1, 10)):
    """Draws the true curve, the K support points and the fits after a few inner steps.

    Args:
      path: PNG file to write.
      task: one unbatched sinusoid task dict (`support_x`, `support_y`, `amplitude`, `phase`).
      panels: ordered mapping from a title ("MAML", "pretrained") to a `maml_tf.MAML`, each
        adapted on the task's support set.
      steps: inner step counts to draw.

    Returns:
      `path`.
    """
    x, y = sinusoid.curve(task["amplitude"], task["phase"])
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for axis, (title, model) in zip(axes[0], panels.items(), strict=True):
        axis.plot(x[:, 0], y[:, 0], color="red", lw=2, label="ground truth")
        axis.scatter(
            task["support_x"][:, 0],
            task["support_y"][:, 0],
            marker="^",
            s=60,
            color="purple",
            zorder=5,
            label=f"{len(task['support_x'])} points used for gradient",
        )
        colours = plt.cm.viridis(np.linspace(0.15, 0.85, len(steps)))
        for colour, step in zip(colours, steps, strict=True):
            weights = model.adapt(task["support_x"], task["support_y"], steps=step)
            prediction = model.forward(weights, x).numpy()
            style = ":" if step == 0 else "--"
            label = "pre-update" if step == 0 else f"{step} grad step{'s' * (step > 1)}"
            axis.plot(x[:, 0], prediction[:, 0], style, color=colour, lw=2, label=label)
        axis.set_title(title)
        axis.set_xlim(*sinusoid.INPUT_RANGE)
        axis.set_ylim(-5.5, 5.5)
        axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _writer_start(path):
    """The sort key of an event file: the time its writer started, then its modification time.

    The start time is in the name (`events.out.tfevents.<seconds>.<host>...`), which a copy or a
    clone keeps and a modification time does not: a committed run's files, checked out in any
    order, still sort by the resumes that wrote them.
    """
    started = os.path.basename(path).split(".")[3]
    return (int(started) if started.isdigit() else 0, os.path.getmtime(path))


def read_scalars(log_dir, tags):
    """Scalars logged in one TensorBoard directory, by tag, against the step they were logged at.

    A resumed run adds event files to the same directory; where two give a value for the same
    step, the file of the later resume (its writer's start time) wins.

    Args:
      log_dir: a directory of event files (a run's `logs/validation`).
      tags: the summary tags to read.

    Returns:
      {tag: {step: value}} with an entry (empty if never logged) for each of `tags`.
    """
    import tensorflow as tf

    paths = sorted(
        glob.glob(os.path.join(os.fspath(log_dir), "events.out.tfevents.*")), key=_writer_start
    )
    values = {tag: {} for tag in tags}
    for path in paths:
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag in values:
                    values[value.tag][event.step] = float(tf.make_ndarray(value.tensor))
    return values


def read_validation_curve(model_dir, tag=VALIDATION_ACCURACY_TAG):
    """The validation metric of a run against meta-updates, from its TensorBoard logs.

    Returns:
      (iterations, values): int64 [n] sorted ascending and float64 [n].
    """
    values = read_scalars(os.path.join(model_dir, LOG_DIR, VALIDATION_RUN), [tag])[tag]
    iterations = np.array(sorted(values), np.int64)
    return iterations, np.array([values[i] for i in iterations], np.float64)


def validation_curves(path, runs, title="Omniglot validation accuracy"):
    """Draws validation query accuracy (%) against meta-updates for one or more runs.

    Args:
      path: PNG file to write.
      runs: ordered mapping from a label to a run's model_dir.
      title: the figure's title.

    Returns:
      `path`.

    Raises:
      UserError: a run has no validation accuracy in its logs.
    """
    figure, axis = plt.subplots(figsize=(7, 4.2))
    for label, model_dir in runs.items():
        iterations, accuracy = read_validation_curve(model_dir)
        if not len(iterations):
            raise UserError(f"{model_dir}: no {VALIDATION_ACCURACY_TAG} in its logs/validation")
        axis.plot(iterations, 100 * accuracy, marker=".", label=label)
    axis.set_xlabel("meta-updates")
    axis.set_ylabel("validation accuracy after adaptation (%)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def main(argv):
    """`python -m maml_tf.plots OUT.png LABEL=MODEL_DIR...`: validation curves of runs."""
    return run_command(
        argv,
        "python -m maml_tf.plots OUT.png LABEL=MODEL_DIR...",
        lambda args: len(args) >= 2 and all("=" in run for run in args[1:]),
        lambda path, *runs: print(validation_curves(path, dict(run.split("=", 1) for run in runs))),
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv))
