"""TensorBoard summaries of a meta-training run that `keras.callbacks.TensorBoard` does not write.

Keras' callback (Keras 3.15) already writes, per epoch, every metric that `MAML.train_step` and
`MAML.test_step` return, as `epoch_<name>`, in the runs `train/` and `validation/` under its log
directory, and the optimizer's learning rate β as `epoch_learning_rate` in `train/`:

- `train/`: `epoch_query_loss`, `epoch_support_loss`, `epoch_query_accuracy`, `epoch_learning_rate`;
- `validation/`: the same three metrics and `epoch_query_loss_step_<i>`,
  `epoch_query_accuracy_step_<i>` for i = 0..eval_inner_steps.

The callbacks here add the rest, written into the log directory itself (the run `logs` under
`tensorboard --logdir=MODEL_DIR`), all through one summary writer:

- the hyperparameters (HParams dashboard), with the validation query loss and accuracy as metrics;
- a custom-scalars layout that overlays the validation query loss (and accuracy) after each inner
  step in one chart per metric;
- classification: one validation episode drawn as two labelled image grids, support and query;
- sinusoid: the fit plot of `plots.sinusoid_fit` on one validation task, every few epochs.

Steps are Keras epochs (0-based), as for the `epoch_*` scalars.

Point TensorBoard at the model directory (or a directory above several), not at `logs/` itself:
there the session is the run ".", the HParams plugin (2.21) looks its metrics up in the run
"./validation" while the run is named "validation", and the metric columns stay empty.

`EpochTensorBoard` is Keras' callback without the per-meta-update calls that write nothing and
leak memory (see there); use it in its place.

Example:

    log_dir = os.path.join(config.model_dir, plots.LOG_DIR)
    callbacks = [
        monitoring.EpochTensorBoard(log_dir=log_dir, write_graph=False),
        *monitoring.monitoring_callbacks(config, datasets, log_dir),
    ]
"""

import io
import os
import time

import keras
import numpy as np
import tensorflow as tf
from matplotlib.figure import Figure
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import summary as custom_scalar_summary
from tensorboard.plugins.hparams import api as hp
from tensorboard.plugins.hparams import api_pb2
from tensorboard.plugins.hparams import summary as hparams_summary

from maml_tf import plots
from maml_tf.config import DATASETS, OMNIGLOT_SPLITS, ROTATIONS

EPISODE_TAGS = {"support": "episode/support", "query": "episode/query"}
SINUSOID_FIT_TAG = "sinusoid_fit"

# The same experiment for every run: the HParams dashboard reads the first one it finds, so runs
# of different data sets compared in one TensorBoard must not disagree about it.
_HPARAMS = (
    hp.HParam("dataset", hp.Discrete(list(DATASETS)), description="data set"),
    hp.HParam("split", hp.Discrete(list(OMNIGLOT_SPLITS)), description="Omniglot class split"),
    hp.HParam(
        "rotation",
        hp.Discrete(list(ROTATIONS)),
        description="Omniglot rotations: drawn per class and episode, as classes, or none",
    ),
    hp.HParam("n_way", description="N, classes per task"),
    hp.HParam("k_shot", description="K, support examples per class (per task for regression)"),
    hp.HParam("n_query", description="query examples per class (per task for regression)"),
    hp.HParam("image_size", description="side of the square images"),
    hp.HParam("learner", hp.Discrete(["mlp", "conv4"]), description="learner f_θ"),
    hp.HParam("conv_variant", hp.Discrete(["strided", "maxpool"]), description="conv4 variant"),
    hp.HParam("filters", description="filters per conv4 layer"),
    hp.HParam(
        "paper_network",
        hp.Discrete([False, True]),
        description="conv4 as the paper's code: no γ, β outer loop only, N(0, 1) head",
    ),
    hp.HParam("inner_lr", display_name="inner_lr (α)", description="α, inner SGD step size"),
    hp.HParam("outer_lr", display_name="outer_lr (β)", description="β, Adam's learning rate"),
    hp.HParam("inner_steps", description="inner SGD steps in meta-training (0: pretrained)"),
    hp.HParam("eval_inner_steps", description="inner SGD steps at validation and meta-test"),
    hp.HParam("first_order", hp.Discrete([False, True]), description="first-order MAML"),
    hp.HParam("meta_batch_size", display_name="meta_batch_size (B)", description="tasks per step"),
    hp.HParam("train_steps", description="meta-updates in all"),
    hp.HParam("steps_per_epoch", description="meta-updates between two validations"),
    hp.HParam("val_tasks", description="fixed validation tasks"),
    hp.HParam("seed", description="initialisation and training task stream"),
    hp.HParam("eval_seed", description="fixed validation and test tasks"),
)
HPARAM_NAMES = tuple(h.name for h in _HPARAMS)


def hparams_metrics(classification=True):
    """The HParams plugin's metrics: the epoch query accuracy and loss of validation and training.

    The plugin looks each metric up in its group, the run Keras' TensorBoard callback writes it
    to. A run's experiment lists the accuracy even for regression, so that it is the same for
    every run in one dashboard; a search, whose experiment is its own, passes `classification`.
    """
    names = ("query_accuracy", "query_loss") if classification else ("query_loss",)
    return [
        hp.Metric(f"epoch_{name}", group=run, display_name=f"{run} {name.replace('_', ' ')}")
        for run in (plots.VALIDATION_RUN, plots.TRAIN_RUN)
        for name in names
    ]


# Read from the model when it has them, so that a run with other values than the config's (the
# pretrained baseline trains with 0 inner steps) reports what it actually used.
_MODEL_HPARAMS = ("inner_lr", "inner_steps", "eval_inner_steps", "first_order")


def run_hparams(config, model=None):
    """The hyperparameters of a run, as the HParams dashboard shows them.

    Args:
      config: a resolved `Config`.
      model: the `MAML` being trained, or None; its `inner_lr`, `inner_steps`,
        `eval_inner_steps` and `first_order` replace the config's.

    Returns:
      Dict from the names in `HPARAM_NAMES` to bool, int, float or str; fields that are None
      (or do not apply, such as `split` and `rotation` outside Omniglot) are left out.
    """
    values = {name: getattr(config, name) for name in HPARAM_NAMES}
    if config.dataset != "omniglot":
        values["split"] = values["rotation"] = None
    if model is not None:
        for name in _MODEL_HPARAMS:
            values[name] = getattr(model, name, values[name])
    return {name: value for name, value in values.items() if value is not None}


def inner_step_layout(classification):
    """Custom-scalars layout: the validation query metrics after each inner step, overlaid.

    Args:
      classification: also chart the accuracy.

    Returns:
      A `layout_pb2.Layout` (regexes over the `epoch_query_*_step_<i>` tags).
    """
    metrics = ["loss", "accuracy"] if classification else ["loss"]
    charts = [
        layout_pb2.Chart(
            title=f"validation query {metric} after each inner step",
            multiline=layout_pb2.MultilineChartContent(tag=[rf"^epoch_query_{metric}_step_\d+$"]),
        )
        for metric in metrics
    ]
    return layout_pb2.Layout(category=[layout_pb2.Category(title="inner steps", chart=charts)])


def first_task(dataset):
    """Task 0 of the first meta-batch of `dataset`, as a dict of NumPy arrays."""
    batch = next(iter(dataset))
    return {key: np.asarray(value[0]) for key, value in batch.items()}


def _png_summary(tag, png, step, description):
    image = tf.io.decode_png(png, channels=3)[None]
    tf.summary.image(tag, image, step=step, description=description)


def episode_grid_png(x, y, title, cell_inches=1.0, dpi=80):
    """Draws one set of an episode as a grid: one column per label, its examples top to bottom.

    Args:
      x: float [n, H, W, C] in [0, 1] (C is 1 or 3).
      y: int [n], labels.
      title: the figure's title.
      cell_inches: size of one image in the figure.
      dpi: resolution.

    Returns:
      PNG bytes.
    """
    x, y = np.asarray(x), np.asarray(y)
    labels = np.unique(y)
    columns = [x[y == label] for label in labels]
    rows = max(len(column) for column in columns)
    width = max(cell_inches * len(labels), 3.0)
    figure = Figure(figsize=(width, cell_inches * rows + 0.7))
    axes = figure.subplots(rows, len(labels), squeeze=False)
    for label, column, column_axes in zip(labels, columns, axes.T, strict=True):
        for i, axis in enumerate(column_axes):
            axis.set_xticks([])
            axis.set_yticks([])
            if i < len(column):
                image = column[i][..., 0] if column[i].shape[-1] == 1 else column[i]
                axis.imshow(image, cmap="gray", vmin=0.0, vmax=1.0)
            else:
                axis.set_axis_off()
        column_axes[0].set_title(f"label {label}", fontsize=9)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def sinusoid_fit_png(model, task, steps, title="MAML"):
    """`plots.sinusoid_fit` for one model, rendered to PNG bytes instead of a file."""
    buffer = io.BytesIO()
    plots.sinusoid_fit(buffer, task, {title: model}, steps=steps)
    return buffer.getvalue()


class _OncePerRun(keras.callbacks.Callback):
    """Writes `write()` into `writer` at the first train begin of a run, and never again.

    Not at a later `fit` given the same callback (a run resumed mid-epoch calls `fit` twice),
    nor when the run resumes in a new process (`resumed`): its log directory has it already,
    and a second copy of the same episode images adds 400 kB per resume to the event files.

    Args:
      writer: a `tf.summary.SummaryWriter`.
      resumed: the run continues from a save, so its log directory has this already.
    """

    def __init__(self, writer, resumed=False):
        super().__init__()
        self.writer = writer
        self._written = resumed

    def write(self):
        raise NotImplementedError

    def on_train_begin(self, logs=None):
        if self._written:
            return
        self._written = True
        with self.writer.as_default():
            self.write()
        self.writer.flush()


class HParamsSummary(_OncePerRun):
    """Writes the run's hyperparameters and the experiment they belong to (HParams dashboard).

    At the run's first train begin: the experiment (hyperparameters and metrics, the same for
    every run) and the session start with `run_hparams(config, model)`; at each train end: the
    session's end (a run made of several `fit` calls, or resumed, ends with its last). Write it
    into the directory given to `EpochTensorBoard`: the metrics are that callback's
    `epoch_query_loss` and `epoch_query_accuracy` in `validation/` and `train/` below it.

    Args:
      writer: a `tf.summary.SummaryWriter` on that log directory.
      config: a resolved `Config`.
      resumed: see `_OncePerRun`.
    """

    def __init__(self, writer, config, resumed=False):
        super().__init__(writer, resumed)
        self.config = config

    def write(self):
        hp.hparams_config(hparams=list(_HPARAMS), metrics=hparams_metrics())
        hp.hparams(run_hparams(self.config, self.model), start_time_secs=int(time.time()))

    def on_train_end(self, logs=None):
        end = hparams_summary.session_end_pb(api_pb2.STATUS_SUCCESS)
        with self.writer.as_default():
            tf.summary.experimental.write_raw_pb(end.SerializeToString(), step=0)
        self.writer.flush()


class InnerStepLayout(_OncePerRun):
    """Writes `inner_step_layout` once per run (Custom Scalars dashboard).

    Args:
      writer: a `tf.summary.SummaryWriter`.
      classification: also chart the accuracy.
      resumed: see `_OncePerRun`.
    """

    def __init__(self, writer, classification, resumed=False):
        super().__init__(writer, resumed)
        self.classification = classification

    def write(self):
        layout = custom_scalar_summary.pb(inner_step_layout(self.classification))
        tf.summary.experimental.write_raw_pb(layout.SerializeToString(), step=0)


class EpisodeImages(_OncePerRun):
    """Writes one episode as two labelled image grids, `episode/support` and `episode/query`.

    Written once per run, at step 0.

    Args:
      writer: a `tf.summary.SummaryWriter`.
      task: one unbatched episode, dict of arrays `support_x` [n, H, W, C] in [0, 1],
        `support_y` [n], `query_x`, `query_y`.
      name: where the episode comes from, for the titles.
    """

    def __init__(self, writer, task, name="validation episode 0"):
        super().__init__(writer)
        self.task = task
        self.name = name

    def write(self):
        for part, tag in EPISODE_TAGS.items():
            x, y = self.task[f"{part}_x"], self.task[f"{part}_y"]
            png = episode_grid_png(x, y, f"{part} set, {len(y)} images")
            description = f"{self.name}, {part} set: one column per label"
            _png_summary(tag, png, 0, description)


class SinusoidFitImages(keras.callbacks.Callback):
    """Writes the sinusoid fit plot on one task as `sinusoid_fit`, at the end of some epochs.

    The plot shows the true curve, the K support points and the model's predictions after 0, 1
    and `eval_inner_steps` inner steps (`plots.sinusoid_fit`). It is written at the end of every
    `every`-th epoch and of the last one, at step `epoch`.

    Args:
      writer: a `tf.summary.SummaryWriter`.
      task: one unbatched sinusoid task (`support_x`, `support_y`, `amplitude`, `phase`).
      every: epochs between two plots.
      name: where the task comes from, for the title.
    """

    def __init__(self, writer, task, every=1, name="validation task 0"):
        super().__init__()
        if every < 1:
            raise ValueError(f"every must be at least 1, got {every}")
        self.writer = writer
        self.task = task
        self.every = every
        self.name = name

    def on_epoch_end(self, epoch, logs=None):
        last = epoch + 1 == self.params.get("epochs")
        if (epoch + 1) % self.every and not last:
            return
        steps = sorted({0, 1, self.model.eval_inner_steps})
        png = sinusoid_fit_png(self.model, self.task, steps, f"{self.name}, epoch {epoch + 1}")
        with self.writer.as_default():
            _png_summary(SINUSOID_FIT_TAG, png, epoch, f"fit after {steps} inner steps")
        self.writer.flush()


class EpochTensorBoard(keras.callbacks.TensorBoard):
    """`keras.callbacks.TensorBoard` with `update_freq="epoch"`, minus a per-batch memory leak.

    Keras 3.15's callback calls `tf.summary.scalar("batch_<metric>", value, step)` for every
    metric after every batch, even with `update_freq="epoch"`, where no writer is set and nothing
    is written. On TensorFlow 2.21 each such call still keeps memory: measured, 100,000 calls
    without a writer grew the resident set by 159 MiB, about 3 MiB per 1,000 meta-updates with
    MAML's two training metrics; in a 30,000-update sinusoid run that was over half of the
    process's growth. This callback drops the batch logs; the epoch summaries, graph and
    profiling are Keras' own.
    """

    def __init__(self, log_dir=plots.LOG_DIR, **kwargs):
        if kwargs.get("update_freq", "epoch") != "epoch":
            raise ValueError("EpochTensorBoard writes per epoch only; use keras' TensorBoard")
        super().__init__(log_dir=log_dir, **kwargs)

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs=None)


def monitoring_callbacks(config, datasets, log_dir, fit_every=1, resumed=False):
    """The callbacks that complete `EpochTensorBoard(log_dir=log_dir)` for MAML.

    Args:
      config: a resolved `Config`.
      datasets: the run's `Datasets` (only `datasets.val` is read: the sample episode, or
        sinusoid task, is its task 0; a resumed classification run does not read it).
      log_dir: the directory given to `EpochTensorBoard` (str or path).
      fit_every: epochs between two sinusoid fit plots.
      resumed: the run continues from a save, so `log_dir` already holds its hyperparameters,
        layout and episode.

    Returns:
      A list of `keras.callbacks.Callback` sharing one summary writer on `log_dir`. Pass the
      same list to every `fit` of one run (a run resumed mid-epoch calls `fit` twice): the
      hyperparameters, layout and episode are written once per run.
    """
    writer = tf.summary.create_file_writer(os.fspath(log_dir))
    callbacks = [
        HParamsSummary(writer, config, resumed),
        InnerStepLayout(writer, config.classification, resumed),
    ]
    if not config.classification:
        callbacks.append(SinusoidFitImages(writer, first_task(datasets.val), every=fit_every))
    elif not resumed:
        # A resumed run's log directory has its episode images, so its first validation
        # episode need not be drawn (sampling one costs a pass over the validation pipeline).
        callbacks.append(EpisodeImages(writer, first_task(datasets.val)))
    return callbacks
