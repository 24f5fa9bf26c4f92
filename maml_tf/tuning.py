"""Hyperparameter search over α, β, the inner step counts and the order, with keras-tuner.

Every trial meta-trains a fresh MAML model for the run's budget (`train_steps` meta-updates in
epochs of `steps_per_epoch`) on the run's task stream and is scored on the fixed validation
tasks: the validation query accuracy (higher is better) for classification, the validation
query loss (lower is better) for regression, after the last inner step, at the trial's best
epoch. Every trial starts from the same initial θ (the config's seed) and meets the same tasks.
A search writes under its directory (`MODEL_DIR/tuning` by default):

    search.json          what the search is (run config and search space); checked on resume
    trials/              keras-tuner's state: oracle.json, trial_<id>/trial.json, weights
    trials/trial_<id>/checkpoints/ the trial's training state, saved as a run's is
    trials/trial_<id>/history.json its epochs' logs (scores), kept across stops
    trials/trial_<id>/error.txt    the traceback of a trial that failed
    logs/                TensorBoard: `tensorboard --logdir DIR/logs`, HParams dashboard
    logs/trial_<id>/     one trial's scalars (train/, validation/) and hyperparameter values
    trials.md            every trial: α, β, steps, order, epochs, score, status
    best.flags           the best trial as flags: `python main.py --flagfile=DIR/best.flags`

Running the same search again continues it: finished trials are kept, a trial that was
interrupted or failed continues from its last save (every `checkpoint_every` meta-updates and
epoch end, as a run's), scored on all its epochs, and `max_trials` may grow. The first SIGTERM
or SIGINT ends the trial under way at the end of its meta-update, with a save there. A search
whose space or run config changed is refused (keras-tuner would silently keep the old space).

A trial whose losses become NaN or infinite (α or β too large) is recorded as diverged and the
search goes on; any other error in a trial stops the search with `UserError` naming the trial.
"""

import collections
import dataclasses
import glob
import json
import math
import os
import shutil
import signal
import traceback

import keras
import keras_tuner as kt
import tensorflow as tf
from absl import logging
from keras_tuner.src.engine import tuner_utils
from tensorboard.plugins.hparams import api as hparams_api

from maml_tf import checkpoints, monitoring, training
from maml_tf.config import TUNERS, TUNING_FIELDS, dataset_reads, with_legacy_fields
from maml_tf.data.datasets import build_datasets
from maml_tf.errors import Stopped, Terminated, UserError

PROJECT = "trials"
LOG_DIR = "logs"
# A search's directory inside MODEL_DIR when --tune_dir is not given.
DEFAULT_DIR = "tuning"
SEARCH_FILE = "search.json"
FLAGFILE = "best.flags"
TRIALS_TABLE = "trials.md"
ERROR_FILE = "error.txt"
HISTORY_FILE = "history.json"
DIVERGED = "diverged"

# The hyperparameters a trial sets, named as their flags.
TUNED = ("inner_lr", "outer_lr", "inner_steps", "eval_inner_steps", "first_order")
# Flags of the search's config that define the task and the model, written to the flagfile
# with the best hyperparameters (when set), so that the final run trains what the trials did.
FLAGFILE_FIELDS = (
    "dataset",
    "data_dir",
    "split",
    "rotation",
    "image_size",
    "cache_dir",
    "n_way",
    "k_shot",
    "n_query",
    "meta_batch_size",
    "learner",
    "resample",
    "conv_variant",
    "filters",
    "paper_network",
    "clip_value",
    "clip_norm",
    "seed",
    "eval_seed",
)
# Config fields that may differ when a search is continued: where files are, output, the
# (equivalent) task loop, what only plain training and meta-testing use, and the fields that
# the resolved search space already holds (and the Config fields that make the space).
CONTINUABLE_CHANGES = tuple(
    # A search's trials all train --train_steps: changing it would change the search.
    name
    for name in training.CONTINUABLE_CHANGES
    if name != "train_steps"
) + ("inner_lr", "outer_lr", "inner_steps", "eval_inner_steps")

TuneResult = collections.namedtuple(
    "TuneResult",
    ["best_hyperparameters", "best_score", "flagfile", "trials_table", "directory"],
)
TuneResult.__doc__ = """What a search found.

Attributes:
  best_hyperparameters: dict of the best trial's values, keyed by flag name: `inner_lr` (α),
    `outer_lr` (β), `inner_steps`, `eval_inner_steps`, `first_order`.
  best_score: the best trial's objective (validation query accuracy or loss), a finite float.
  flagfile: path of `best.flags`.
  trials_table: every trial as a markdown table (also written to `trials.md`).
  directory: the search's directory.
"""


def _pair(value, name, kind):
    if value is None:
        return None
    try:
        low, high = (kind(v) for v in value)
    except (TypeError, ValueError):
        raise UserError(f"--{name}={value}: give two numbers, LOW,HIGH") from None
    return low, high


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """What to search and how: the ranges, the tuner, its budget and its directory.

    A range of None takes the default of `resolve`; a range with LOW == HIGH fixes the value.

    Attributes:
      tuner: "random", "bayesian" (Gaussian process) or "hyperband".
      max_trials: trials in all (for hyperband too: its brackets repeat until then).
      directory: where the search lives (None: MODEL_DIR/tuning).
      inner_lr_range: (low, high) of α, sampled on a log scale. Default: a decade either side
        of the config's α.
      outer_lr_range: (low, high) of β, log scale. Default: a decade either side of β.
      inner_steps_range: (low, high) of the meta-training inner steps. Default: the config's.
      eval_inner_steps_range: (low, high) of the inner steps at validation. Default: the
        config's.
      tune_first_order: search first- and second-order MAML (else the config's `first_order`).
      hyperband_factor: hyperband's reduction factor η (trials kept per round: 1/η).
      initial_points: random trials before the Gaussian process guides a bayesian search
        (None: 3 × the number of searched hyperparameters; keras-tuner's own default counts
        the fixed ones too, 15 trials, so that a short search would never use the process).
    """

    tuner: str = "random"
    max_trials: int = 10
    directory: str | None = None
    inner_lr_range: tuple[float, float] | None = None
    outer_lr_range: tuple[float, float] | None = None
    inner_steps_range: tuple[int, int] | None = None
    eval_inner_steps_range: tuple[int, int] | None = None
    tune_first_order: bool = False
    hyperband_factor: int = 3
    initial_points: int | None = None

    def __post_init__(self):
        for name, kind, smallest in [
            ("inner_lr_range", float, None),
            ("outer_lr_range", float, None),
            ("inner_steps_range", int, 1),
            ("eval_inner_steps_range", int, 0),
        ]:
            bounds = _pair(getattr(self, name), name, kind)
            object.__setattr__(self, name, bounds)
            if bounds is None:
                continue
            low, high = bounds
            too_small = low <= 0 if smallest is None else low < smallest
            if too_small or high < low or not all(math.isfinite(v) for v in bounds):
                least = "0 < LOW" if smallest is None else f"{smallest} <= LOW"
                raise UserError(f"--{name}={low},{high}: needs {least} <= HIGH")
        if self.tuner not in TUNERS:
            raise UserError(f"--tuner={self.tuner}: one of {', '.join(TUNERS)}")
        if self.max_trials < 1:
            raise UserError(f"--max_trials={self.max_trials} must be at least 1")
        if self.hyperband_factor < 2:
            raise UserError(f"--hyperband_factor={self.hyperband_factor} must be at least 2")
        if self.initial_points is not None and self.initial_points < 1:
            raise UserError(f"--initial_points={self.initial_points} must be at least 1")

    @classmethod
    def from_config(cls, config):
        """The search a `Config` with the tuning fields asks for (`--mode=tune`)."""
        values = {name: getattr(config, name) for name in TUNING_FIELDS}
        # The one field whose name differs: the Config's says which directory it is.
        values["directory"] = values.pop("tune_dir")
        return cls(**values)

    def resolve(self, config):
        """A copy with every default filled in from a resolved `Config`."""

        def around(value):
            return (value / 10, value * 10)

        return dataclasses.replace(
            self,
            directory=self.directory or os.path.join(config.model_dir, DEFAULT_DIR),
            inner_lr_range=self.inner_lr_range or around(config.inner_lr),
            outer_lr_range=self.outer_lr_range or around(config.outer_lr),
            inner_steps_range=self.inner_steps_range or (config.inner_steps,) * 2,
            eval_inner_steps_range=self.eval_inner_steps_range or (config.eval_inner_steps,) * 2,
        )

    @property
    def searched(self):
        """How many hyperparameters a resolved space searches (the others are fixed)."""
        ranges = (
            self.inner_lr_range,
            self.outer_lr_range,
            self.inner_steps_range,
            self.eval_inner_steps_range,
        )
        return sum(low < high for low, high in ranges) + self.tune_first_order


def declare(hp, space, first_order):
    """Declares the search space on `hp`; returns this trial's values, keyed by flag name.

    Args:
      hp: `keras_tuner.HyperParameters`.
      space: a resolved `SearchSpace`.
      first_order: the value of `first_order` when it is not searched.
    """

    def real(name, bounds):
        low, high = bounds
        if low == high:
            return hp.Fixed(name, low)
        return hp.Float(name, low, high, sampling="log")

    def integer(name, bounds):
        low, high = bounds
        if low == high:
            return hp.Fixed(name, low)
        return hp.Int(name, low, high)

    return {
        "inner_lr": real("inner_lr", space.inner_lr_range),
        "outer_lr": real("outer_lr", space.outer_lr_range),
        "inner_steps": integer("inner_steps", space.inner_steps_range),
        "eval_inner_steps": integer("eval_inner_steps", space.eval_inner_steps_range),
        "first_order": (
            hp.Boolean("first_order", default=first_order)
            if space.tune_first_order
            else hp.Fixed("first_order", first_order)
        ),
    }


def _hparams_domains(space, first_order):
    """TensorBoard's HParam for each searched hyperparameter, keyed by flag name."""

    def real(bounds):
        low, high = (float(v) for v in bounds)
        return hparams_api.Discrete([low]) if low == high else hparams_api.RealInterval(low, high)

    def integer(bounds):
        low, high = (int(v) for v in bounds)
        return hparams_api.Discrete([low]) if low == high else hparams_api.IntInterval(low, high)

    orders = [False, True] if space.tune_first_order else [first_order]
    domains = {
        "inner_lr": real(space.inner_lr_range),
        "outer_lr": real(space.outer_lr_range),
        "inner_steps": integer(space.inner_steps_range),
        "eval_inner_steps": integer(space.eval_inner_steps_range),
        "first_order": hparams_api.Discrete(orders),
    }
    return {name: hparams_api.HParam(name, domain) for name, domain in domains.items()}


class MamlHyperModel(kt.HyperModel):
    """Builds and meta-trains the MAML model of one trial.

    `build(hp)` makes the config's learner and wraps it in `MAML` with the trial's α, inner
    steps, validation inner steps and order, compiled with Adam(β) (and the config's gradient
    clipping). `fit` meta-trains it with Keras `fit` on the run's task stream, validating on the
    fixed validation tasks after every epoch, and logs the trial for TensorBoard.

    Args:
      config: the search's resolved `Config` (data, learner, budget).
      space: the resolved `SearchSpace`.
      datasets: `build_datasets(config)`.
      log_dir: TensorBoard directory of the search; trial `i` logs to `log_dir/trial_<i>`.
      trials_dir: keras-tuner's project directory; trial `i` saves its state under
        `trials_dir/trial_<i>`.
      stop_requests: an entered `checkpoints.StopRequests` whose signal stops the trial under
        way with a save (`TrialStopped`), or None.

    Raises:
      UserError: `config.train_steps` is not a whole number of epochs (`Config.epochs`).
    """

    def __init__(self, config, space, datasets, log_dir, trials_dir, stop_requests=None):
        super().__init__(name="maml", tunable=True)
        self.config = config
        self.space = space
        self.datasets = datasets
        self.log_dir = log_dir
        self.trials_dir = trials_dir
        self.stop_requests = stop_requests
        config.epochs()  # refuses a train_steps that is not a whole number of epochs
        self.monitor, self.mode = training._monitor(config)
        self.hparams = _hparams_domains(space, config.first_order)

    def declare_hyperparameters(self, hp):
        declare(hp, self.space, self.config.first_order)

    def trial_config(self, hp):
        """The config of a trial: the search's config with the trial's values."""
        values = declare(hp, self.space, self.config.first_order)
        return dataclasses.replace(self.config, **values)

    def build(self, hp):
        config = self.trial_config(hp)
        keras.utils.set_random_seed(config.seed)
        model = training.build_model(config, training.build_learner(config))
        model.compile(
            optimizer=keras.optimizers.Adam(
                config.outer_lr, clipvalue=config.clip_value, global_clipnorm=config.clip_norm
            )
        )
        return model

    def fit(self, hp, model, trial_id, callbacks=(), epochs=None, initial_epoch=0, verbose=None):
        """Meta-trains `model` for the trial, continuing from the trial's last save if any.

        The trial's state (θ, Adam's slots, the meta-update count) is saved under
        `trials/trial_<id>/checkpoints` as a run's is (`checkpoint_every`, each epoch end), and
        each epoch's logs in `trials/trial_<id>/history.json`; a trial that was stopped or
        failed continues from there when the search runs again, with the scores of its
        earlier epochs, rather than starting over.

        Args:
          hp: the trial's `HyperParameters`.
          model: the compiled model of `build(hp)` (hyperband: with the weights of the trial
            it continues).
          trial_id: keras-tuner's trial id, names the trial's directories.
          callbacks: keras-tuner's callbacks (best-epoch weights, progress).
          epochs: the epoch to stop at (hyperband); default: the whole budget.
          initial_epoch: the epoch to start from (hyperband, when continuing a trial).
          verbose: Keras progress output (default: the config's).

        Returns:
          A `keras.callbacks.History` of every epoch of the trial, before and after a stop.

        Raises:
          checkpoints.NonFiniteError: the training or validation losses were not finite.
          TrialStopped: a stop signal arrived (`stop_requests`); the trial's state is saved,
            or, for a signal that came before the trial began, nothing of it was written.
        """
        stop = self.stop_requests
        if stop is not None and stop.signum is not None:
            # It came between two trials: stop before this one touches its files.
            raise TrialStopped(trial_id, stop.signum, None)
        trial_dir = os.path.join(self.trials_dir, f"trial_{trial_id}")
        log_dir = os.path.join(self.log_dir, f"trial_{trial_id}")
        state = checkpoints.TrainingState(
            os.path.join(trial_dir, checkpoints.CHECKPOINT_DIR),
            model,
            keep=self.config.keep_checkpoints,
            mode=self.mode,
        )
        # A hyperband trial that continues another starts its own count at `initial_epoch`.
        first_update = initial_epoch * self.config.epoch_steps
        done = first_update + state.restore()
        history_path = os.path.join(trial_dir, HISTORY_FILE)
        earlier = _read_history(history_path) if done > first_update else {}
        if done > first_update:
            logging.info("trial %s continues from its save at meta-update %d", trial_id, done)
            best = _best_score(earlier, self.monitor, self.mode)
            # keras-tuner's best-epoch weights must not be replaced by a worse epoch after the
            # stop (hyperband continues a trial from them).
            for callback in callbacks:
                if isinstance(callback, tuner_utils.SaveBestEpoch) and best is not None:
                    callback.best_value = best
        else:
            # Started from scratch: no logs of an earlier attempt may remain.
            shutil.rmtree(log_dir, ignore_errors=True)
            values = {self.hparams[name]: value for name, value in _values(hp).items()}
            writer = tf.summary.create_file_writer(log_dir)
            with writer.as_default():
                hparams_api.hparams(values, trial_id=f"trial_{trial_id}")
            writer.close()

        tensorboard = monitoring.EpochTensorBoard(log_dir=log_dir, write_graph=False)
        saver = checkpoints.SaveTrainingState(
            state, self.config.checkpoint_every or self.config.epoch_steps, self.monitor
        )
        try:
            training.fit_from(
                model,
                self.datasets,
                done,
                epochs or self.config.epochs(),
                self.config.epoch_steps,
                [
                    checkpoints.StopOnNonFinite(),
                    *callbacks,
                    tensorboard,
                    # Before the saver: an epoch whose logs are written but whose save is not
                    # is run again, and its logs replaced.
                    _RecordHistory(history_path, earlier),
                    saver,
                    *([checkpoints.StopOnSignal(stop)] if stop is not None else []),
                ],
                self.config.verbose if verbose is None else verbose,
            )
        except checkpoints.StopRequested as request:
            saver.save()
            tensorboard.on_train_end()
            raise TrialStopped(trial_id, request.signum, first_update + state.step) from None
        history = _as_history(earlier)
        for name in dict.fromkeys(["val_query_loss", self.monitor]):
            for value in history.history.get(name, []):
                if not math.isfinite(value):
                    step = int(model.optimizer.iterations.numpy())
                    raise checkpoints.NonFiniteError(step, f"the validation {name[4:]} ({value})")
        return history


class _RecordHistory(keras.callbacks.Callback):
    """Writes each epoch's logs into `epochs` ({epoch: logs}) and to `path` (JSON), atomically."""

    def __init__(self, path, epochs):
        super().__init__()
        self.path = path
        self.epochs = epochs

    def on_epoch_end(self, epoch, logs=None):
        self.epochs[epoch] = {name: float(value) for name, value in (logs or {}).items()}
        checkpoints.atomic_write_text(
            self.path, json.dumps({str(e): v for e, v in sorted(self.epochs.items())})
        )


def _read_history(path):
    """{epoch: logs} as `_RecordHistory` wrote them ({} when there is no file)."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {int(epoch): logs for epoch, logs in json.load(f).items()}


def _best_score(epochs, monitor, mode):
    scores = [
        logs[monitor] for logs in epochs.values() if math.isfinite(logs.get(monitor, math.nan))
    ]
    if not scores:
        return None
    return max(scores) if mode == "max" else min(scores)


def _as_history(epochs):
    """A `keras.callbacks.History` of {epoch: logs}, epochs in order (what keras-tuner scores)."""
    history = keras.callbacks.History()
    history.epoch = sorted(epochs)
    names = dict.fromkeys(name for logs in epochs.values() for name in logs)
    history.history = {
        name: [epochs[e].get(name, math.nan) for e in history.epoch] for name in names
    }
    return history


def _values(hp):
    """The trial's values of `TUNED` (hyperband adds its own `tuner/...` entries)."""
    return {name: hp.get(name) for name in TUNED}


class TrialError(kt.errors.FatalError):
    """A trial failed for another reason than diverging: the search stops.

    keras-tuner does not catch a `FatalError`. Raised from `run_trial` (an error while building
    or training), the trial stays RUNNING in keras-tuner's saved state and the next run of the
    search continues it from its last save (`rerun`); raised after keras-tuner itself marked
    the trial FAILED (an error while it read the results), the trial stays failed.

    Args:
      trial_id: keras-tuner's trial id.
      values: the trial's hyperparameters (`TUNED`).
      reason: one line, e.g. "ValueError: what went wrong".
      traceback_path: the file with the traceback.
      rerun: whether the next run of the search runs the trial again.
    """

    def __init__(self, trial_id, values, reason, traceback_path, rerun):
        self.trial_id = trial_id
        self.traceback_path = traceback_path
        self.rerun = rerun
        super().__init__(f"trial {trial_id} ({_describe(values)}) failed: {reason}")


class TrialStopped(kt.errors.FatalError):
    """A stop signal ended the search at trial `trial_id`, with a save of its state if it began.

    A `FatalError`, so that keras-tuner leaves the trial RUNNING in its saved state: the next
    run of the search continues it from the save (or starts it, if it had not begun).

    Attributes:
      trial_id: keras-tuner's trial id.
      signum: the signal's number.
      step: the trial's meta-updates done (what the save holds), or None if the signal came
        before the trial began (nothing of it is saved).
    """

    def __init__(self, trial_id, signum, step):
        self.trial_id = trial_id
        self.signum = signum
        self.step = step
        name = signal.Signals(signum).name
        if step is None:
            super().__init__(f"{name} before trial {trial_id} began")
        else:
            super().__init__(f"{name} during trial {trial_id}, after its meta-update {step}")


class TrialUserError(kt.errors.FatalError):
    """A `UserError` in trial `trial_id` (e.g. its save cannot be read): the search stops.

    Not a failed trial: its message already says what to fix, and the next run of the search
    runs the trial again once it is fixed.
    """

    def __init__(self, trial_id, values, error):
        super().__init__(f"trial {trial_id} ({_describe(values)}): {error}")


def _reason(error):
    lines = str(error).strip().splitlines()
    return type(error).__name__ + (f": {lines[0]}" if lines else "")


def _describe(values):
    return (
        f"α={values['inner_lr']:.4g}, β={values['outer_lr']:.4g}, "
        f"inner_steps={values['inner_steps']}, eval_inner_steps={values['eval_inner_steps']}, "
        f"{'first' if values['first_order'] else 'second'} order"
    )


class _MamlTuner:
    """What maml_tf adds to a keras-tuner tuner: loud failures, no build to find the space."""

    def _populate_initial_space(self):
        # keras-tuner builds a model here to discover the space; ours is declared up front.
        hp = self.oracle.get_space()
        self.hypermodel.declare_hyperparameters(hp)
        self.oracle.update_space(hp)

    def run_trial(self, trial, *args, **kwargs):
        stale = os.path.join(self.get_trial_dir(trial.trial_id), ERROR_FILE)
        if os.path.exists(stale):  # from a run of this trial that failed
            os.remove(stale)
        try:
            return super().run_trial(trial, *args, trial_id=trial.trial_id, **kwargs)
        except checkpoints.NonFiniteError as error:
            logging.warning(
                "trial %s (%s) diverged: %s",
                trial.trial_id,
                _describe(_values(trial.hyperparameters)),
                error,
            )
            # FAILED without retries; the search goes on.
            raise kt.errors.FailedTrialError(f"{DIVERGED}: {error}") from error
        except (kt.errors.FailedTrialError, TrialStopped):
            raise
        except UserError as error:
            raise TrialUserError(trial.trial_id, _values(trial.hyperparameters), error) from None
        except Exception as error:
            path = os.path.join(self.get_trial_dir(trial.trial_id), ERROR_FILE)
            with open(path, "w") as f:
                f.write(traceback.format_exc())
            values = _values(trial.hyperparameters)
            raise TrialError(trial.trial_id, values, _reason(error), path, True) from error

    def on_trial_end(self, trial):
        super().on_trial_end(trial)
        # keras-tuner marks a trial FAILED, and goes on, when reading its results fails (e.g.
        # the objective is missing) or its score is NaN.
        ended = self.oracle.get_trial(trial.trial_id)
        status = _trial_status(ended)
        if ended.status == kt.engine.trial.TrialStatus.FAILED and not status.startswith(DIVERGED):
            path = os.path.join(self.get_trial_dir(trial.trial_id), ERROR_FILE)
            with open(path, "w") as f:
                f.write(ended.message or "no score\n")
            values = _values(ended.hyperparameters)
            raise TrialError(trial.trial_id, values, status[len("failed: ") :], path, False)


class _RandomSearch(_MamlTuner, kt.RandomSearch):
    pass


class _BayesianOptimization(_MamlTuner, kt.BayesianOptimization):
    pass


class _Hyperband(_MamlTuner, kt.Hyperband):
    pass


def _make_tuner(config, space, hypermodel):
    common = {
        "hypermodel": hypermodel,
        "objective": kt.Objective(hypermodel.monitor, hypermodel.mode),
        # keras-tuner takes a seed of 0 as "no seed".
        "seed": config.seed + 1,
        # Diverged trials are FAILED and the search goes on; other errors end it at once.
        "max_consecutive_failed_trials": None,
        "directory": space.directory,
        "project_name": PROJECT,
        "overwrite": False,
    }
    if space.tuner == "random":
        return _RandomSearch(max_trials=space.max_trials, **common)
    if space.tuner == "bayesian":
        return _BayesianOptimization(
            max_trials=space.max_trials,
            num_initial_points=space.initial_points or max(3 * space.searched, 1),
            **common,
        )
    tuner = _Hyperband(
        max_epochs=hypermodel.config.epochs(),
        factor=space.hyperband_factor,
        hyperband_iterations=None,  # brackets repeat until max_trials
        **common,
    )
    tuner.oracle.max_trials = space.max_trials
    return tuner


def _jsonable(value):
    return json.loads(json.dumps(value))


def _check_same_search(config, space):
    """Writes `search.json`, or refuses to continue a search that was something else."""
    path = os.path.join(space.directory, SEARCH_FILE)
    search = _jsonable(
        {
            "config": dataclasses.asdict(config),
            "space": {
                k: v
                for k, v in dataclasses.asdict(space).items()
                if k not in ("max_trials", "directory")
            },
        }
    )
    started = os.path.exists(os.path.join(space.directory, PROJECT, "oracle.json"))
    if started and not os.path.exists(path):
        raise UserError(
            f"--tune_dir={space.directory}: holds a search without {SEARCH_FILE}; "
            "use another --tune_dir"
        )
    if not started:
        # No trial has started yet: whatever was tried before is replaced.
        training.make_dir(space.directory, "tune_dir")
        with open(path, "w") as f:
            json.dump(search, f, indent=2, sort_keys=True)
        return
    with open(path) as f:
        saved = json.load(f)
    saved["config"] = with_legacy_fields(saved["config"])
    ignored = set(CONTINUABLE_CHANGES) | set(config.allow_changed)
    changed = [
        f"--{name}={value} (the search used {saved['space'].get(name)})"
        for name, value in search["space"].items()
        if saved["space"].get(name) != value
    ] + [
        f"--{name}={value} (the search used {saved['config'].get(name)})"
        for name, value in search["config"].items()
        if name not in ignored and saved["config"].get(name) != value
    ]
    if changed:
        raise UserError(
            f"--tune_dir={space.directory} holds a search with other settings: "
            f"{'; '.join(changed)}. Continue it with its settings, or use another --tune_dir"
        )


def _write_hparams_config(log_dir, hypermodel, config):
    """The HParams dashboard's experiment (domains and metrics), written once per search."""
    if glob.glob(os.path.join(log_dir, "events.out.tfevents*")):
        return
    writer = tf.summary.create_file_writer(log_dir)
    with writer.as_default():
        hparams_api.hparams_config(
            hparams=list(hypermodel.hparams.values()),
            metrics=monitoring.hparams_metrics(config.classification),
        )
    writer.close()


def _trial_status(trial):
    if trial.status == kt.engine.trial.TrialStatus.COMPLETED:
        return "completed"
    message = (trial.message or "").strip().splitlines()
    reason = message[-1].split("FailedTrialError: ", 1)[-1] if message else ""
    if trial.status == kt.engine.trial.TrialStatus.FAILED:
        return reason if reason.startswith(DIVERGED) else f"failed: {reason or 'no score'}"
    return trial.status.lower()


def _trials_table(oracle, objective, best_id, epochs):
    columns = ["trial", "α", "β", "inner steps", "eval inner steps", "order", "epochs"]
    columns += [objective, "status"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    trials = [oracle.trials[i] for i in oracle.start_order if i in oracle.trials]
    for trial in trials:
        values = trial.hyperparameters.values
        trained = str(values.get("tuner/epochs", epochs))
        if "tuner/trial_id" in values:
            trained += f" (from trial {values['tuner/trial_id']})"
        score = "" if trial.score is None else f"{trial.score:.4g}"
        status = _trial_status(trial) + (", best" if trial.trial_id == best_id else "")
        order = "first" if values.get("first_order") else "second"
        lines.append(
            f"| {trial.trial_id} | {values.get('inner_lr', float('nan')):.4g} "
            f"| {values.get('outer_lr', float('nan')):.4g} | {values.get('inner_steps')} "
            f"| {values.get('eval_inner_steps')} | {order} | {trained} | {score} | {status} |"
        )
    return "\n".join(lines) + "\n"


def _flag(name, value):
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no{name}"
    return f"--{name}={value!r}" if isinstance(value, float) else f"--{name}={value}"


def _flagfile_text(config, space, best, score, objective, completed):
    fields = [
        name
        for name in FLAGFILE_FIELDS
        if getattr(config, name) is not None
        # Only the flags the data set reads: a flagfile with another would be refused.
        and dataset_reads(name, config.dataset)
    ]
    lines = [
        f"# Best of {completed} completed trials of the {space.tuner} search in "
        f"{space.directory}: {objective} {score:.6g}.",
        f"# Trials trained {config.train_steps} meta-updates; without --train_steps the final "
        "run trains the data set's default number. Add --model_dir=DIR.",
        *(_flag(name, getattr(config, name)) for name in fields),
        *(_flag(name, best[name]) for name in TUNED),
    ]
    return "\n".join(lines) + "\n"


def tune(config, space=None):
    """Searches α, β, the inner step counts and the order; writes the best as a flagfile.

    Args:
      config: a `Config`, resolved here: the data, learner and per-trial budget
        (`train_steps`, `steps_per_epoch`) of every trial, and the defaults of the space.
      space: a `SearchSpace` (default: `SearchSpace.from_config(config)`, for a config with
        the tuning fields).

    Returns:
      `TuneResult`.

    Raises:
      UserError: bad flags or data, a search in the directory with other settings, a trial that
        failed (naming it and its error; running again continues it), a trial's own bad input
        such as a save that cannot be read (naming the trial; the message says what to fix), or
        no trial that completed.
      Stopped: a SIGTERM or SIGINT; the trial under way is saved, and running the search again
        continues it from there.
      KeyboardInterrupt: a second Ctrl-C (`errors.Terminated`: a second SIGTERM, in a process
        that called `errors.raise_on_sigterm`); running the search again continues the trial
        under way from its last save.
    """
    if space is None:
        space = SearchSpace.from_config(config)
    config = config.resolve()
    training.set_threads(config.inter_op_threads, config.intra_op_threads)
    space = space.resolve(config)
    config.epochs()  # refuses a --train_steps that is not a whole number of epochs
    _check_same_search(config, space)
    datasets = build_datasets(config)
    log_dir = os.path.join(space.directory, LOG_DIR)
    stop = checkpoints.StopRequests()
    trials_dir = os.path.join(space.directory, PROJECT)
    hypermodel = MamlHyperModel(config, space, datasets, log_dir, trials_dir, stop)
    _write_hparams_config(log_dir, hypermodel, config)
    tuner = _make_tuner(config, space, hypermodel)
    try:
        with stop:
            tuner.search(verbose=config.verbose)
    except TrialStopped as request:
        saved = (
            f"saved in {os.path.join(trials_dir, f'trial_{request.trial_id}')}; "
            if request.step is not None
            else ""
        )
        raise Stopped(
            f"{request}: {saved}run the same command again to continue the search from there",
            request.signum,
            request.step,
        ) from None
    except TrialUserError as error:
        raise UserError(str(error)) from None
    except TrialError as error:
        again = (
            f"continues trial {error.trial_id} from its last save"
            if error.rerun
            else f"goes on with other trials (trial {error.trial_id} stays failed)"
        )
        raise UserError(
            f"{error}; traceback in {error.traceback_path}. Running the search again {again}"
        ) from error
    except (KeyboardInterrupt, Terminated):
        logging.warning(
            "search in %s interrupted: run it again to continue it (the trial that was "
            "running continues from its last save)",
            space.directory,
        )
        raise

    oracle = tuner.oracle
    objective = f"{hypermodel.monitor} ({hypermodel.mode})"
    completed = [
        t
        for t in oracle.trials.values()
        if t.status == kt.engine.trial.TrialStatus.COMPLETED
        and t.score is not None
        and math.isfinite(t.score)
    ]
    best = None
    if completed:
        best = sorted(completed, key=lambda t: t.score, reverse=hypermodel.mode == "max")[0]
    table = _trials_table(oracle, objective, best and best.trial_id, hypermodel.config.epochs())
    checkpoints.atomic_write_text(os.path.join(space.directory, TRIALS_TABLE), table)
    if best is None:
        counts = collections.Counter(_trial_status(t).split(":")[0] for t in oracle.trials.values())
        statuses = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        raise UserError(
            f"no trial of the search in {space.directory} completed ({statuses or 'none ran'}; "
            f"see {TRIALS_TABLE} there): narrow --inner_lr_range and --outer_lr_range towards "
            "smaller steps, or use another --tune_dir"
        )
    values = _values(best.hyperparameters)
    flagfile = os.path.join(space.directory, FLAGFILE)
    checkpoints.atomic_write_text(
        flagfile,
        _flagfile_text(config, space, values, best.score, hypermodel.monitor, len(completed)),
    )
    logging.info(
        "best of %d trials: trial %s (%s), %s %.6g; flags in %s",
        len(completed),
        best.trial_id,
        _describe(values),
        hypermodel.monitor,
        best.score,
        flagfile,
    )
    if stop.signum is not None:
        # It came after the last trial's last check: the search is complete and written, but
        # the user asked for the process to end.
        name = signal.Signals(stop.signum).name
        raise Stopped(
            f"{name} after the search's last trial: it is complete, best flags in {flagfile}",
            stop.signum,
            None,
        )
    return TuneResult(values, float(best.score), flagfile, table, space.directory)


def summary(result):
    """The text `main.py` prints at the end of a search."""
    return "\n".join(
        [
            result.trials_table.rstrip(),
            f"best: {_describe(result.best_hyperparameters)}, score {result.best_score:.6g}",
            f"train it: python main.py --flagfile={result.flagfile} --model_dir=DIR",
            f"TensorBoard: tensorboard --logdir {os.path.join(result.directory, LOG_DIR)}",
        ]
    )
