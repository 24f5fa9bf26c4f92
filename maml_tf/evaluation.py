"""The meta-test protocol: fixed tasks, adaptation curves, means with 95% confidence intervals."""

import collections

import numpy as np
import tensorflow as tf

EvalResult = collections.namedtuple(
    "EvalResult",
    ["num_tasks", "loss_mean", "loss_ci", "accuracy_mean", "accuracy_ci"],
)
EvalResult.__doc__ = """Meta-test results after 0, 1, ..., steps inner steps.

Attributes:
  num_tasks: number of tasks averaged.
  loss_mean, loss_ci: float64 [steps + 1], mean query loss and the half-width of its 95%
    confidence interval (1.96 · sample std / √num_tasks), after each inner step.
  accuracy_mean, accuracy_ci: the same for query accuracy, or None for regression.
"""


def mean_and_ci95(values):
    """Mean over axis 0 and the half-width of the normal 95% CI of that mean.

    Args:
      values: float [num_tasks, ...].

    Returns:
      (mean, half_width), each shaped like values[0].
    """
    values = np.asarray(values, np.float64)
    n = values.shape[0]
    # A diverged task (inf) makes these NaN or inf; that is the answer, not a warning to print.
    with np.errstate(invalid="ignore", over="ignore"):
        mean = values.mean(axis=0)
        if n < 2:
            return mean, np.full_like(mean, np.nan)
        return mean, 1.96 * values.std(axis=0, ddof=1) / np.sqrt(n)


def task_curves(model, dataset, steps=None):
    """Adapts to every task of a finite dataset and records the query metrics after each step.

    Args:
      model: a `maml_tf.MAML`.
      dataset: finite `tf.data.Dataset` of meta-batches (episode dicts).
      steps: inner steps (default `model.eval_inner_steps`).

    Returns:
      (losses, accuracies): float64 [num_tasks, steps + 1]; accuracies is None for regression.
    """
    steps = model.eval_inner_steps if steps is None else int(steps)

    @tf.function(reduce_retracing=True)
    def run(episodes):
        results = model.task_results(episodes, steps, every_step=True, task_loop="map")
        return results.query_losses, results.query_accuracies

    losses, accuracies = [], []
    for episodes in dataset:
        loss, accuracy = run(episodes)
        losses.append(loss.numpy())
        if accuracy is not None:
            accuracies.append(accuracy.numpy())
    losses = np.concatenate(losses).astype(np.float64)
    accuracies = np.concatenate(accuracies).astype(np.float64) if accuracies else None
    return losses, accuracies


def evaluate(model, dataset, steps=None):
    """Meta-tests `model` on the fixed tasks of `dataset`: see `EvalResult`."""
    losses, accuracies = task_curves(model, dataset, steps)
    loss_mean, loss_ci = mean_and_ci95(losses)
    accuracy_mean = accuracy_ci = None
    if accuracies is not None:
        accuracy_mean, accuracy_ci = mean_and_ci95(accuracies)
    return EvalResult(len(losses), loss_mean, loss_ci, accuracy_mean, accuracy_ci)


def result_to_dict(result):
    """JSON-ready form of an `EvalResult`."""

    def listed(array):
        return None if array is None else [float(v) for v in array]

    return {
        "num_tasks": int(result.num_tasks),
        "query_loss_mean": listed(result.loss_mean),
        "query_loss_ci95": listed(result.loss_ci),
        "query_accuracy_mean": listed(result.accuracy_mean),
        "query_accuracy_ci95": listed(result.accuracy_ci),
    }


def format_table(columns, digits=4):
    """A plain-text table of adaptation curves.

    Args:
      columns: ordered mapping from a column title to (mean, ci) arrays of equal length
        (one row per inner step).
      digits: decimals shown.

    Returns:
      The table as a string, one row per inner step, cells as `mean ± ci`.
    """
    titles = list(columns)
    rows = len(next(iter(columns.values()))[0])
    cells = [
        [f"{columns[t][0][i]:.{digits}f} ± {columns[t][1][i]:.{digits}f}" for t in titles]
        for i in range(rows)
    ]
    width = max([len(t) for t in titles] + [len(c) for row in cells for c in row])
    lines = ["step  " + "  ".join(t.rjust(width) for t in titles)]
    lines += [f"{i:>4}  " + "  ".join(c.rjust(width) for c in row) for i, row in enumerate(cells)]
    return "\n".join(lines)
