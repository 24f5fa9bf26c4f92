"""Training state that survives a kill: θ, Adam's slots, the iteration count, the best score.

A run saves its state under `MODEL_DIR/checkpoints/<name>/` every `every_steps` meta-updates
and at the end of every epoch, keeping the last `keep` saves, and separately the state at the
best validation score. Running the same command again restores the newest readable save and
continues from there.

The data pipeline's position is the iteration count: episode i of the training stream is a
pure function of (seed, i) (`maml_tf.data`), so a run resumed after s meta-updates builds its
stream from episode s·B and draws exactly the episodes the uninterrupted run would have.

A SIGTERM or SIGINT during `fit` (`StopRequests`, `StopOnSignal`) ends training at the end of
the meta-update under way, for the caller to save there, rather than losing the meta-updates
since the last periodic save.

Saves are atomic: `tf.train.CheckpointManager` writes a save's files completely before it
rewrites the small `checkpoint` index file, and rewrites that with a rename, so a kill during a
save leaves the index naming the previous complete save. A save that is unreadable anyway (a
damaged disk, a file truncated by hand) is skipped with a warning in favour of an older one.
"""

import collections
import math
import os
import shutil
import signal
import threading
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from maml_tf.errors import UserError

CHECKPOINT_DIR = "checkpoints"
# Under `MODEL_DIR/checkpoints/<name>/`: the last saves, and the save at the best validation.
LATEST = "latest"
BEST = "best"


# Free space a save needs beyond its variables' bytes: file-format overhead, the index, and what
# TensorBoard and the other files of the run write beside it.
SAVE_MARGIN_BYTES = 1 << 20


class SaveError(UserError):
    """A save could not be written (a full disk, a path through a file); nothing was replaced."""


def _variable_bytes(variables):
    # Keras variables give their dtype as a name, TensorFlow's as a DType.
    return sum(
        math.prod(v.shape) * np.dtype(getattr(v.dtype, "as_numpy_dtype", v.dtype)).itemsize
        for v in variables
    )


def check_room(directory, needed_bytes):
    """Raises `SaveError` unless the disk of `directory` has `needed_bytes` and a margin free.

    h5py does not fail cleanly when its disk fills during a write: measured, with h5py 3.14 on a
    full 3 MB tmpfs, Keras' `save_weights` ended the process with a segmentation fault, where no
    error line can be printed. So the space is checked before writing.
    """
    existing = os.path.abspath(directory)
    while not os.path.isdir(existing):
        existing = os.path.dirname(existing)
    free = shutil.disk_usage(existing).free
    if free < needed_bytes + SAVE_MARGIN_BYTES:
        raise SaveError(
            f"{directory}: its disk has {free / 1e6:.2f} MB free, a save needs about "
            f"{(needed_bytes + SAVE_MARGIN_BYTES) / 1e6:.2f} MB"
        )


def _cannot_write(path, error):
    reason = getattr(error, "strerror", None) or str(error).strip().splitlines()[0]
    return SaveError(f"{path}: cannot write it ({reason})")


def atomic_save_weights(learner, path):
    """`learner.save_weights(path)` through a temporary file and a rename: never half-written.

    Raises:
      SaveError: no room on the disk, or the file cannot be written; `path` is as it was.
    """
    check_room(os.path.dirname(path) or ".", _variable_bytes(learner.weights))
    temporary = f"{path[: -len('.weights.h5')]}.partial.weights.h5"
    try:
        learner.save_weights(temporary)
        os.replace(temporary, path)
    except OSError as error:
        raise _cannot_write(path, error) from None


def atomic_write_text(path, text):
    """Writes `text` to `path` through a temporary file and a rename: never half-written.

    Raises:
      OSError: the file cannot be written; `path` is as it was.
    """
    partial = f"{path}.partial"
    try:
        with open(partial, "w") as f:
            f.write(text)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


class TrainingState:
    """Everything a meta-training run needs to continue after a kill.

    Saved: the learner's variables (θ, and any non-trainable ones), the optimizer's variables
    (Adam's moments and its iteration count, which is the number of meta-updates done), the
    best validation score so far, and the wall time spent training.

    Args:
      directory: where the saves go (`MODEL_DIR/checkpoints/<name>`).
      model: a compiled `maml_tf.MAML` (its optimizer built).
      keep: how many of the latest saves to keep (the best one is kept apart).
      mode: "max" or "min", the direction in which the validation score improves.
    """

    def __init__(self, directory, model, keep=3, mode="max"):
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.model = model
        self.mode = mode
        self.best_score = tf.Variable(math.nan, dtype=tf.float64, trainable=False)
        self.train_seconds = tf.Variable(0.0, dtype=tf.float64, trainable=False)
        self._checkpoint = tf.train.Checkpoint(
            learner=list(model.learner.variables),
            optimizer=model.optimizer,
            best_score=self.best_score,
            train_seconds=self.train_seconds,
        )
        self._latest = tf.train.CheckpointManager(
            self._checkpoint, os.path.join(directory, LATEST), max_to_keep=keep
        )
        self._best = tf.train.CheckpointManager(
            self._checkpoint, os.path.join(directory, BEST), max_to_keep=1
        )

    @property
    def step(self):
        """Meta-updates done so far (the optimizer's iteration count)."""
        return int(self.model.optimizer.iterations.numpy())

    def restore(self):
        """Restores the newest readable save, if any.

        Returns:
          The number of meta-updates the restored state had done (0 when there was no save).

        Raises:
          UserError: there are saves, but none can be read.
        """
        saves = list(reversed(self._latest.checkpoints))
        # Keras keeps a constant β as an optimizer variable, so a save would bring back the β
        # it was made with: a run continued with another --outer_lr (--allow_changed) would
        # silently keep the old one. β is the run's setting, not its state.
        # A schedule is not a variable: it follows the restored iteration count by itself.
        learning_rate = self.model.optimizer.learning_rate
        given = float(learning_rate) if isinstance(learning_rate, keras.Variable) else None
        for path in saves:
            try:
                self._checkpoint.restore(path).assert_existing_objects_matched()
            except Exception as error:  # noqa: BLE001 - TF raises many kinds for a bad file
                logging.warning("cannot read checkpoint %s (%s); trying an older one", path, error)
                continue
            logging.info("resumed from %s after %d meta-updates", path, self.step)
            if given is not None and float(learning_rate) != given:
                logging.info(
                    "outer_lr (β) is now %g; the save was trained with %g",
                    given,
                    float(learning_rate),
                )
                learning_rate.assign(given)
            return self.step
        if saves:
            raise UserError(
                f"{self._latest.directory}: no checkpoint can be read ({', '.join(saves)}); "
                "move the directory away to start the run over"
            )
        return 0

    def save(self):
        """Saves the current state as the latest, numbered by the iteration count.

        Raises:
          SaveError: no room on the disk, or the save cannot be written; the saves already
            made are as they were.
        """
        if self.saved():
            return
        self._write(self._latest, self.step)

    def saved(self):
        """Whether the newest save is of the current meta-update."""
        return self._latest.latest_checkpoint == self._path(self.step)

    def _write(self, manager, step):
        check_room(manager.directory, _variable_bytes(self._variables()))
        try:
            manager.save(checkpoint_number=step)
        except (OSError, tf.errors.OpError) as error:
            raise _cannot_write(manager.directory, error) from None

    def _variables(self):
        return [*self.model.learner.variables, *self.model.optimizer.variables]

    def latest_path(self):
        """The newest save's path prefix, or None."""
        return self._latest.latest_checkpoint

    def latest_description(self):
        """Where the newest save is and after how many meta-updates, for messages."""
        path = self._latest.latest_checkpoint
        if path is None:
            return f"none yet in {self._latest.directory}"
        return f"meta-update {path.rsplit('-', 1)[1]}, {path}"

    def save_best(self):
        """Saves the current state as the best one (`SaveError` as `save`)."""
        self._write(self._best, self.step)

    def improved(self, score):
        """Whether `score` beats the best validation score so far."""
        if not math.isfinite(score):
            return False
        best = float(self.best_score.numpy())
        if math.isnan(best):
            return True
        return score > best if self.mode == "max" else score < best

    def _path(self, step):
        return f"{self._latest._checkpoint_prefix}-{step}"


Save = collections.namedtuple("Save", ["meta_updates", "train_seconds", "best_score", "path"])
Save.__doc__ = """One save of a `TrainingState`, read without building a model.

Fields:
  meta_updates: int, the optimizer's iteration count when it was saved.
  train_seconds: float, wall time spent training up to it.
  best_score: float, the best validation score up to it (NaN before the first validation).
  path: the save's path prefix.
"""


def _saved(reader, name):
    # `name` is a key of `TrainingState`'s `tf.train.Checkpoint` (Keras' optimizer keeps its
    # iteration count as `_iterations`).
    return reader.get_tensor(f"{name}/.ATTRIBUTES/VARIABLE_VALUE")


def read_saves(directory):
    """The saves a `TrainingState` keeps in `directory`, oldest first.

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
            saves.append(
                Save(
                    int(_saved(reader, "optimizer/_iterations")),
                    float(_saved(reader, "train_seconds")),
                    float(_saved(reader, "best_score")),
                    path,
                )
            )
        except tf.errors.OpError as error:
            reason = (str(error).splitlines() or [type(error).__name__])[0]
            raise UserError(f"{path}: cannot read this save ({reason})") from None
    return sorted(saves, key=lambda save: save.meta_updates)


class NonFiniteError(Exception):
    """Training produced a non-finite loss or weights; nothing after the last good save was kept.

    Attributes:
      step: the meta-update at which it was found.
      what: which quantity was not finite.
    """

    def __init__(self, step, what):
        super().__init__(f"meta-update {step}: {what} is not finite")
        self.step = step
        self.what = what


def _all_finite(variables):
    return all(bool(tf.reduce_all(tf.math.is_finite(v))) for v in variables)


class StopOnNonFinite(keras.callbacks.Callback):
    """Raises `NonFiniteError` at the first meta-update whose losses are NaN or infinite.

    Raising (rather than `stop_training`) skips the epoch-end and train-end callbacks, so the
    poisoned state is never saved. Put it before `SaveTrainingState` in the callback list.

    Args:
      keys: the training logs to check.
    """

    def __init__(self, keys=("query_loss", "support_loss")):
        super().__init__()
        self.keys = keys

    def on_train_batch_end(self, batch, logs=None):
        for key in self.keys:
            value = (logs or {}).get(key)
            if value is not None and not math.isfinite(float(value)):
                step = int(self.model.optimizer.iterations.numpy())
                raise NonFiniteError(step, f"the training {key} ({float(value)})")


class SaveTrainingState(keras.callbacks.Callback):
    """Saves a `TrainingState` every `every_steps` meta-updates, at each epoch end and at the end.

    At an epoch end it first checks the validation score `monitor`: if it improved, the
    learner's weights go to `best_weights_path` (atomically) and the state to the best save.

    Args:
      state: the run's `TrainingState` (restored before `fit`).
      every_steps: meta-updates between two saves within an epoch.
      monitor: the Keras log name of the validation score (e.g. "val_query_accuracy").
      best_weights_path: file for the learner's weights at the best score, or None.
    """

    def __init__(self, state, every_steps, monitor, best_weights_path=None):
        super().__init__()
        self.state = state
        self.every_steps = every_steps
        self.monitor = monitor
        self.best_weights_path = best_weights_path

    def on_train_begin(self, logs=None):
        self._step = self.state.step
        self._seconds_before = float(self.state.train_seconds.numpy())
        self._start = time.perf_counter()

    def _count_seconds(self):
        self.state.train_seconds.assign(self._seconds_before + time.perf_counter() - self._start)

    def save(self):
        """Saves the state now (no-op if the newest save is of this meta-update).

        Raises:
          NonFiniteError: θ is not finite; the last good save is left as it was.
        """
        # A step can give finite losses and still non-finite weights (an overflowing gradient);
        # such a state must not replace the last good save.
        if not _all_finite(self.model.learner.trainable_variables):
            raise NonFiniteError(self.state.step, "the learner's weights θ")
        # Counted only into a save that is written, so that the time in memory, which the
        # run's results.json reports, is the time its newest save holds.
        if self.state.saved():
            return
        self._count_seconds()
        self.state.save()

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        # An epoch's last step is saved at the epoch end, after validation, with its score.
        if self._step % self.every_steps == 0 and batch + 1 < self.params["steps"]:
            self.save()

    def on_epoch_end(self, epoch, logs=None):
        score = (logs or {}).get(self.monitor)
        if score is not None and self.state.improved(float(score)):
            self.state.best_score.assign(float(score))
            # Else the best save would carry the time of the previous save, not its own.
            self._count_seconds()
            if self.best_weights_path:
                atomic_save_weights(self.model.learner, self.best_weights_path)
            self.state.save_best()
        self.save()

    def on_train_end(self, logs=None):
        self.save()


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequests:
    """Catches the first SIGTERM or SIGINT that arrives while it is entered (`with`).

    A scheduler's SIGTERM, or Ctrl-C, ends a process wherever it is, losing every meta-update
    since the last save: up to a whole epoch by default (16 minutes of 20-way 1-shot Omniglot on
    two cores). Inside `with StopRequests() as stop:`, the first of these signals only records
    itself in `stop.signum`, for `StopOnSignal` to act on at the end of the meta-update under
    way. A second signal, of either kind, acts as it would outside: SIGINT raises
    `KeyboardInterrupt`, SIGTERM raises `errors.Terminated` in a process that called
    `errors.raise_on_sigterm` (as `main.py` does) and otherwise ends the process at once; the
    saves already made are intact either way.

    Python lets only the main thread install handlers; in another thread nothing is caught.
    """

    def __init__(self, signals=STOP_SIGNALS):
        self.signals = tuple(signals)
        self.signum = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        # Whichever of the signals comes next then acts at once.
        for each in self._previous:
            signal.signal(each, self._restorable(each))
        if self.signum is None:
            self.signum = signum
            logging.warning(
                "%s received: stopping after this meta-update, with a save (send it again to "
                "stop at once)",
                signal.Signals(signum).name,
            )

    def _restorable(self, signum):
        # None: the handler was not installed from Python; the default is the closest.
        previous = self._previous.get(signum)
        return signal.SIG_DFL if previous is None else previous

    def __exit__(self, *exc_info):
        for signum in self._previous:
            signal.signal(signum, self._restorable(signum))
        self._previous.clear()
        return False


class StopRequested(Exception):  # noqa: N818 - a request, like KeyboardInterrupt
    """A stop signal arrived during `fit`; raised by `StopOnSignal` after the step's callbacks.

    Attributes:
      signum: the signal's number.
      step: the meta-updates done when it was acted on.
    """

    def __init__(self, signum, step):
        super().__init__(f"{signal.Signals(signum).name} after meta-update {step}")
        self.signum = signum
        self.step = step


class StopOnSignal(keras.callbacks.Callback):
    """Raises `StopRequested` at the first meta-update or epoch end after a stop signal.

    Raising (rather than `stop_training`, after which Keras would validate and close a partial
    epoch as if it were whole) leaves the epoch for the resumed run to finish. Put it last in
    the callback list, so the step's other callbacks (the NaN check first) have run; the caller
    saves the state (`SaveTrainingState.save`).

    Args:
      requests: the entered `StopRequests`.
    """

    def __init__(self, requests):
        super().__init__()
        self.requests = requests

    def _check(self):
        if self.requests.signum is not None:
            step = int(self.model.optimizer.iterations.numpy())
            raise StopRequested(self.requests.signum, step)

    def on_train_batch_end(self, batch, logs=None):
        self._check()

    def on_epoch_end(self, epoch, logs=None):
        # A signal during validation: the epoch's save has just been made.
        self._check()
