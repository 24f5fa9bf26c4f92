"""Meta-training and meta-testing runs: what `python main.py` does, callable from tests too."""

import collections
import dataclasses
import json
import math
import os
import signal
import time

import keras
import tensorflow as tf
from absl import logging

from maml_tf import checkpoints, evaluation, export, learners, monitoring, plots
from maml_tf.config import CONFIG_FILE, ONEDNN_NAMES, TUNING_FIELDS, Config
from maml_tf.data.datasets import build_datasets
from maml_tf.errors import Stopped, Terminated, UserError
from maml_tf.maml import MAML

FINAL_WEIGHTS = "learner.weights.h5"
BEST_WEIGHTS = "best.weights.h5"
BASELINE_WEIGHTS = "baseline.weights.h5"
RESULTS = "results.json"
EXPORT_DIR = "export"
EVAL_RESULTS = "eval_results.json"
VAL_RESULTS = "val_results.json"
# Step sizes tried for fine-tuning the pretrained baseline at test time; the paper tuned the
# baseline's step size automatically, here the best on the validation tasks is kept.
BASELINE_INNER_LRS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
# Normalisation at meta-test time, as in the paper's code: TaskNormalization always uses the
# statistics of the set it is applied to (support or query set of one task).
NORMALISATION = "batch statistics of each set (transductive, as the original MAML code)"


def _normalisation(config):
    """How the learner normalises, for the meta-test protocol."""
    if config.learner != "conv4":
        return "none"
    if config.paper_network:
        return NORMALISATION + "; no scale, offsets learned by the outer loop only"
    return NORMALISATION


RunResult = collections.namedtuple(
    "RunResult",
    [
        "config",
        "test",
        "baseline_test",
        "baseline_inner_lr",
        "train_seconds",
        "figure_path",
        "protocol",
        "test_seconds",
    ],
)
RunResult.__doc__ = """What a run measured.

Attributes:
  config: the resolved `Config`.
  test: `evaluation.EvalResult` of MAML on the fixed test tasks.
  baseline_test: the same for the pretrained baseline, or None.
  baseline_inner_lr: the baseline's fine-tuning step size chosen on the validation tasks.
  train_seconds: wall time of meta-training (None when only evaluating).
  figure_path: the sinusoid fit plot, or None.
  protocol: dict with everything that defines the meta-test (split, ways, shots, query size,
    tasks, inner steps, α, normalisation, seed, weights used).
  test_seconds: wall time of MAML's meta-test (the baseline's is not included).
"""


def build_learner(config):
    """The learner f_θ that a resolved config names."""
    if config.learner == "mlp":
        return learners.mlp()
    if config.learner == "conv4":
        # Four 2x2 max-pools with "valid" padding need at least 16 pixels a side.
        if config.conv_variant == "maxpool" and config.image_size < 16:
            raise UserError(
                f"--image_size={config.image_size} is too small for conv4 with max-pooling "
                "(four 2x2 pools need at least 16); use a larger size or --conv_variant=strided"
            )
        return learners.conv4(
            config.n_way,
            image_shape=config.image_shape,
            variant=config.conv_variant,
            filters=config.filters,
            paper_network=config.paper_network,
        )
    raise UserError(f"--learner={config.learner}: unknown learner")


def build_model(config, learner, inner_lr=None, inner_steps=None):
    """Wraps `learner` in `MAML` with the config's hyperparameters (overrides for baselines)."""
    return MAML(
        learner,
        inner_lr=config.inner_lr if inner_lr is None else inner_lr,
        inner_steps=config.inner_steps if inner_steps is None else inner_steps,
        eval_inner_steps=config.eval_inner_steps,
        first_order=config.first_order,
        loss="sparse_categorical_crossentropy" if config.classification else "mse",
        task_loop=config.task_loop,
        outer_only=learners.outer_only(learner, config.paper_network),
    )


def _monitor(config):
    """The validation score that picks the best checkpoint: (Keras log name, mode)."""
    if config.classification:
        return "val_query_accuracy", "max"
    return "val_query_loss", "min"


def _fit(config, model, datasets, log_dir, state_dir, best_path=None):
    """Meta-trains `model` for `config.train_steps`, resuming from the saves in `state_dir`.

    The first SIGTERM or SIGINT during training ends it at the end of the meta-update under
    way, with a save, rather than losing the meta-updates since the last periodic save.

    Returns:
      The run's `checkpoints.TrainingState` (with the total training wall time).

    Raises:
      Stopped: a stop signal arrived; the state is saved.
      UserError: a non-finite loss or θ (the last good save is kept), or a `train_steps` that is
        not a whole number of epochs (`Config.epochs`) or is below the run's meta-updates done.
    """
    epochs, steps_per_epoch = config.epochs(), config.epoch_steps
    model.compile(
        optimizer=keras.optimizers.Adam(
            config.outer_lr, clipvalue=config.clip_value, global_clipnorm=config.clip_norm
        )
    )
    monitor, mode = _monitor(config)
    state = checkpoints.TrainingState(state_dir, model, keep=config.keep_checkpoints, mode=mode)
    done = state.restore()
    if done > config.train_steps:
        raise UserError(
            f"--train_steps={config.train_steps}: the run in {config.model_dir} has already "
            f"done {done} meta-updates"
        )
    tensorboard = monitoring.EpochTensorBoard(log_dir=log_dir, write_graph=False)
    saver = checkpoints.SaveTrainingState(
        state, config.checkpoint_every or steps_per_epoch, monitor, best_path
    )
    stop = checkpoints.StopRequests()
    callbacks = [
        tensorboard,
        *monitoring.monitoring_callbacks(config, datasets, log_dir, resumed=done > 0),
        checkpoints.StopOnNonFinite(),
        saver,
        checkpoints.StopOnSignal(stop),
    ]
    try:
        with stop:
            try:
                fit_from(model, datasets, done, epochs, steps_per_epoch, callbacks, config.verbose)
            except checkpoints.StopRequested as request:
                saver.save()
                # Closes its writers, as the train end that the raise skipped would have.
                tensorboard.on_train_end()
                raise _stopped(request.signum, state) from None
        if stop.signum is not None:
            # The signal came after the last check (in the final save): the run is complete
            # and saved, but the user asked for the process to end.
            raise _stopped(stop.signum, state)
    except checkpoints.NonFiniteError as error:
        raise UserError(
            f"{error}; training stopped. The last good save ({state.latest_description()}) is "
            "intact: run again with a smaller --inner_lr or --outer_lr, or with --clip_value or "
            "--clip_norm, adding --allow_changed=<the flags you changed> to resume from it"
        ) from None
    except checkpoints.SaveError as error:
        if state.latest_path() is None:
            again = "nothing was saved yet: make room, then run the same command again"
        else:
            again = (
                f"the last save ({state.latest_description()}) is intact: make room, then run "
                "the same command again to continue from it"
            )
        raise checkpoints.SaveError(
            f"{error}; training stopped at meta-update {state.step}, {again}"
        ) from None
    return state


class _StopAfterEpoch(keras.callbacks.Callback):
    """Ends a `fit` after its first epoch, validation and epoch-end callbacks included."""

    def on_epoch_end(self, epoch, logs=None):
        self.model.stop_training = True


def fit_from(model, datasets, done, epochs, steps_per_epoch, callbacks, verbose):
    """`model.fit` from meta-update `done` to the end of epoch `epochs`, on the training stream.

    Keras epochs cannot start part-way, so a run stopped mid-epoch first finishes that epoch
    with a shorter `fit`, then runs the remaining whole epochs. The stream starts at episode
    batch `done`, the one the uninterrupted run would meet next.

    Args:
      model: a compiled `MAML`, its state restored to meta-update `done`.
      datasets: `build_datasets(config)`.
      done: meta-updates already done, counted from the start of epoch 0.
      epochs: the epoch to end at.
      steps_per_epoch: meta-updates per epoch.
      callbacks: Keras callbacks for every `fit`.
      verbose: Keras progress output.

    Returns:
      The `keras.callbacks.History` of each `fit`, in order (none when `done` is the end).
    """
    epoch, into_epoch = divmod(done, steps_per_epoch)
    segments = []
    if into_epoch:
        segments.append((epoch, steps_per_epoch - into_epoch))
        # Its progress line shows only the number of meta-updates left, not how many are done.
        logging.info(
            "meta-update %d is part-way through epoch %d of %d: its last %d meta-updates run "
            "first, then the remaining epochs",
            done,
            epoch + 1,
            epochs,
            steps_per_epoch - into_epoch,
        )
        epoch += 1
    if epoch < epochs:
        segments.append((epoch, steps_per_epoch))
    histories = []
    for first_epoch, steps in segments:
        # The short fit is given the run's epoch count, so that Keras shows "Epoch 18/60"
        # rather than "Epoch 18/18", and stops itself after one epoch.
        short = [_StopAfterEpoch()] if steps < steps_per_epoch else []
        histories.append(
            model.fit(
                datasets.train_from(done),
                initial_epoch=first_epoch,
                epochs=epochs,
                steps_per_epoch=steps,
                validation_data=datasets.val,
                callbacks=[*callbacks, *short],
                shuffle=False,
                verbose=verbose,
            )
        )
        done = (first_epoch + 1) * steps_per_epoch
    return histories


def _stopped(signum, state):
    request = checkpoints.StopRequested(signum, state.step)
    return Stopped(
        f"{request}: saved in {state.latest_path()}; run the same command again to continue",
        signum,
        state.step,
    )


def _tune_baseline_lr(config, baseline, val):
    best = None
    for inner_lr in BASELINE_INNER_LRS:
        result = evaluation.evaluate(build_model(config, baseline.learner, inner_lr), val)
        final = float(result.loss_mean[-1])
        logging.info("baseline fine-tuning α=%g: validation loss %.4f", inner_lr, final)
        if math.isfinite(final) and (best is None or final < best[1]):
            best = (inner_lr, final)
    if best is None:
        raise UserError("the pretrained baseline diverged for every fine-tuning step size")
    return best[0]


def _train_baseline(config, datasets):
    """The paper's comparison: θ pretrained on the same tasks without adaptation (k = 0)."""
    keras.utils.set_random_seed(config.seed)
    baseline = build_model(config, build_learner(config), inner_steps=0)
    _fit(
        config,
        baseline,
        datasets,
        os.path.join(config.model_dir, plots.LOG_DIR, "baseline"),
        os.path.join(config.model_dir, checkpoints.CHECKPOINT_DIR, "baseline"),
    )
    checkpoints.atomic_save_weights(
        baseline.learner, os.path.join(config.model_dir, BASELINE_WEIGHTS)
    )
    inner_lr = _tune_baseline_lr(config, baseline, datasets.val)
    return build_model(config, baseline.learner, inner_lr), inner_lr


def load_weights(config, model, directory):
    """Loads the weights `config.checkpoint` names from a run directory; returns the file name.

    Raises:
      UserError: no weights there, or weights of another network.
    """
    best = os.path.join(directory, BEST_WEIGHTS)
    if config.checkpoint == "best" and os.path.exists(best):
        path, loaders = best, (model.learner.load_weights, model.load_weights)
    else:
        path, loaders = os.path.join(directory, FINAL_WEIGHTS), (model.learner.load_weights,)
        if not os.path.exists(path):
            raise UserError(f"{directory}: no weights ({path} is missing)")
    # Runs before the resumable checkpoints saved the whole MAML model as the best weights;
    # anything else that does not load is another network.
    for i, load in enumerate(loaders):
        try:
            load(path)
        except ValueError as error:
            if i + 1 < len(loaders):
                continue
            reason = str(error).strip().splitlines()[0]
            raise UserError(
                f"{path}: these weights do not fit the network the run's config.json "
                f"describes ({reason})"
            ) from None
        return os.path.basename(path)


def _check_init_from(config):
    """Refuses an `init_from` that is missing or whose network differs from the run's."""
    source = saved_config(config.init_from, "init_from")
    for name in (
        "dataset",
        "learner",
        "conv_variant",
        "filters",
        "paper_network",
        "n_way",
        "image_size",
    ):
        if getattr(source, name) != getattr(config, name):
            raise UserError(
                f"--init_from={config.init_from} is a model with {name}={getattr(source, name)}, "
                f"but this run has {name}={getattr(config, name)}"
            )


def _init_from(config, model):
    """Sets θ to the weights of the run or pretrained model in `config.init_from`."""
    used = load_weights(config, model, config.init_from)
    logging.info("θ initialised from %s", os.path.join(config.init_from, used))


def _finish(
    config,
    model,
    datasets,
    train_seconds,
    baseline,
    baseline_inner_lr,
    results_name,
    weights_dir,
    split="test",
):
    weights = os.path.join(weights_dir, load_weights(config, model, weights_dir))
    tasks, num_tasks = (
        (datasets.test, config.test_tasks) if split == "test" else (datasets.val, config.val_tasks)
    )
    protocol = {
        **datasets.protocol,
        "dataset": config.dataset,
        "tasks": split,
        f"{split}_tasks": num_tasks,
        "eval_seed": config.eval_seed,
        "eval_inner_steps": config.eval_inner_steps,
        "inner_lr": config.inner_lr,
        "normalisation": _normalisation(config),
        "weights": weights,
        "confidence_interval": "95%, 1.96 * sample std / sqrt(tasks)",
    }
    start = time.perf_counter()
    test = evaluation.evaluate(model, tasks)
    test_seconds = time.perf_counter() - start
    baseline_test = figure_path = None
    if baseline is not None:
        baseline_test = evaluation.evaluate(baseline, tasks)
    # The fit plot shows a meta-test task; a validation leaves the one already drawn.
    if config.dataset == "sinusoid" and split == "test":
        task = {k: v[0] for k, v in next(iter(datasets.test)).items()}
        panels = {"MAML": model}
        if baseline is not None:
            panels[f"pretrained, step size {baseline_inner_lr}"] = baseline
        figure_path = plots.sinusoid_fit(
            os.path.join(config.model_dir, "sinusoid_fit.png"),
            task,
            panels,
            steps=sorted({0, 1, config.eval_inner_steps}),
        )
    result = RunResult(
        config,
        test,
        baseline_test,
        baseline_inner_lr,
        train_seconds,
        figure_path,
        protocol,
        test_seconds,
    )
    # Atomic: a stop or a full disk during the write leaves the previous results whole.
    checkpoints.atomic_write_text(
        os.path.join(config.model_dir, results_name),
        json.dumps(
            {
                "config": dataclasses.asdict(config),
                "protocol": protocol,
                "train_seconds": train_seconds,
                "test_seconds": test_seconds,
                "test": evaluation.result_to_dict(test),
                "baseline_test": baseline_test and evaluation.result_to_dict(baseline_test),
                "baseline_inner_lr": baseline_inner_lr,
            },
            indent=2,
        ),
    )
    return result


# Fields of a Config that may differ when the run in a model_dir is continued: where files are,
# output, the total step count, the (equivalent) task loop, saving and the meta-test protocol.
CONTINUABLE_CHANGES = (
    "model_dir",
    "data_dir",
    "cache_dir",
    "verbose",
    "inter_op_threads",
    "intra_op_threads",
    "train_steps",
    "task_loop",
    "checkpoint",
    "checkpoint_every",
    "keep_checkpoints",
    "allow_changed",
    "export_dir",
    "overwrite",
    "test_tasks",
    "baseline",
    *TUNING_FIELDS,
)


def _check_same_run(config):
    """Refuses to continue a run in `config.model_dir` trained with other hyperparameters."""
    unknown = sorted(set(config.allow_changed) - {f.name for f in dataclasses.fields(config)})
    if unknown:
        raise UserError(f"--allow_changed: {', '.join(unknown)} is not a flag of a run")
    started = os.path.exists(os.path.join(config.model_dir, checkpoints.CHECKPOINT_DIR))
    if not (started and os.path.exists(config.config_path)):
        return
    saved = dataclasses.asdict(Config.load(config.config_path))
    ignored = set(CONTINUABLE_CHANGES) | set(config.allow_changed)
    changed = [
        f"--{name}={value} (the run used {saved.get(name)})"
        for name, value in dataclasses.asdict(config).items()
        if name not in ignored and saved.get(name) != value
    ]
    if changed:
        raise UserError(
            f"--model_dir={config.model_dir} holds a run with other hyperparameters: "
            f"{'; '.join(changed)}. Continue it with them anyway with --allow_changed="
            f"{','.join(name.split('=')[0][2:] for name in changed)}, or use another --model_dir"
        )


def make_dir(path, flag):
    """Creates the directory `path` and its parents; a `UserError` naming `--flag` if it cannot."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise UserError(f"--{flag}={path}: cannot create it ({error.strerror})") from None


def onednn():
    """Whether TensorFlow runs its CPU ops with oneDNN kernels in this process (None: unknown).

    Decided once, when TensorFlow loads: by `TF_ENABLE_ONEDNN_OPTS`, else by the processor.
    """
    try:
        # Not public API, hence the fallback; it reports the decision TensorFlow took.
        from tensorflow.python.util import _pywrap_util_port

        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        return None


def set_threads(inter_op_threads=0, intra_op_threads=0):
    """Sizes TensorFlow's thread pools (0 keeps its default); before the process's first op.

    Raises:
      UserError: TensorFlow already runs with other pool sizes in this process.
    """
    threading = tf.config.threading
    for name, wanted, get, put in [
        (
            "inter_op_threads",
            inter_op_threads,
            threading.get_inter_op_parallelism_threads,
            threading.set_inter_op_parallelism_threads,
        ),
        (
            "intra_op_threads",
            intra_op_threads,
            threading.get_intra_op_parallelism_threads,
            threading.set_intra_op_parallelism_threads,
        ),
    ]:
        if not wanted or get() == wanted:
            continue
        try:
            put(wanted)
        except RuntimeError:
            raise UserError(
                f"--{name}={wanted}: TensorFlow already runs in this process with "
                f"{get() or 'its default'}; set it before the first TensorFlow op"
            ) from None
    logging.info("oneDNN kernels: %s", ONEDNN_NAMES[onednn()])
    if inter_op_threads or intra_op_threads:
        logging.info(
            "TensorFlow thread pools: inter-op %d, intra-op %d (0: its default)",
            threading.get_inter_op_parallelism_threads(),
            threading.get_intra_op_parallelism_threads(),
        )


def train(config):
    """Meta-trains, saves the learner's weights, then meta-tests (and the baseline, if asked).

    Writes under `config.model_dir`: `config.json`, `learner.weights.h5` (final θ),
    `best.weights.h5` (best validation score), TensorBoard logs in `logs/`, `results.json` and,
    for sinusoid, `sinusoid_fit.png`.

    Args:
      config: a `Config` (resolved here).

    Returns:
      `RunResult`.

    Raises:
      UserError: bad data or flag combinations.
      Stopped: SIGTERM or SIGINT during meta-training; the state is saved, and calling again
        with the same config continues the run. Also a SIGINT (`KeyboardInterrupt`) or, in a
        process that called `errors.raise_on_sigterm`, a SIGTERM during the baseline's step-size
        choice, the meta-test or the export after it: calling again goes straight to them.
    """
    config = config.resolve()
    set_threads(config.inter_op_threads, config.intra_op_threads)
    _check_same_run(config)
    if config.init_from:
        _check_init_from(config)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    datasets = build_datasets(config)
    make_dir(config.model_dir, "model_dir")
    config.save(config.config_path)
    keras.utils.set_random_seed(config.seed)
    model = build_model(config, build_learner(config))
    if config.init_from:
        # Before `_fit`, which replaces θ again when it resumes the run from a save.
        _init_from(config, model)
    state = _fit(
        config,
        model,
        datasets,
        os.path.join(config.model_dir, plots.LOG_DIR),
        os.path.join(config.model_dir, checkpoints.CHECKPOINT_DIR, "maml"),
        best_path=os.path.join(config.model_dir, BEST_WEIGHTS),
    )
    train_seconds = float(state.train_seconds.numpy())
    checkpoints.atomic_save_weights(model.learner, os.path.join(config.model_dir, FINAL_WEIGHTS))
    logging.info("meta-training took %.1f s", train_seconds)

    stage, again = (
        "the baseline",
        "continue the baseline from its last save, then meta-test and export the run",
    )
    try:
        baseline = baseline_inner_lr = None
        if config.baseline:
            baseline, baseline_inner_lr = _train_baseline(config, datasets)
        again = "meta-test and export the run without meta-training it again"
        stage = "the meta-test"
        result = _finish(
            config,
            model,
            datasets,
            train_seconds,
            baseline,
            baseline_inner_lr,
            RESULTS,
            config.model_dir,
        )
        stage = "the export"
        # The run's own export, of the weights it meta-tested, replaced when the run is re-run.
        export.export_model(model, os.path.join(config.model_dir, EXPORT_DIR), overwrite=True)
    except (KeyboardInterrupt, Terminated) as interrupt:
        # The run is complete and saved: say so, rather than that it may continue from a save.
        signum = signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT
        raise Stopped(
            f"{signal.Signals(signum).name} during {stage}, after meta-training: its "
            f"{state.step} meta-updates are saved in {state.latest_path()}; run the same "
            f"command again to {again}",
            signum,
            state.step,
        ) from None
    return result


# Fields of a Config that may differ between training and a later meta-test of the same run
# (meta-testing with another shot count than training is a common protocol).
EVAL_OVERRIDES = (
    "data_dir",
    "rotation",
    "cache_dir",
    "test_tasks",
    "eval_seed",
    "eval_inner_steps",
    "k_shot",
    "n_query",
    "checkpoint",
    "verbose",
)


def evaluate(config, split="test"):
    """Meta-tests the run saved in `config.model_dir`, or the model in `config.init_from`.

    The saved config decides the model; its protocol fields (`EVAL_OVERRIDES`) are replaced by
    those set in `config`.

    Args:
      config: a `Config` whose `init_from` or else `model_dir` holds a trained run (or a
        pretrained model: `config.json` and weights).
      split: "test", the run's `test_tasks` fixed meta-test tasks; or "val", its `val_tasks`
        fixed validation tasks (see `validate`).

    Returns:
      `RunResult` with `train_seconds` None; also written to `MODEL_DIR/eval_results.json`
      (`val_results.json` for "val"; a training run's `results.json` is left as it was).

    Raises:
      UserError: no run there, a flag that contradicts the saved model, or bad data.
    """
    saved = _saved_run(config)
    set_threads(config.inter_op_threads, config.intra_op_threads)
    if saved.deterministic:
        tf.config.experimental.enable_op_determinism()
    weights_dir = saved.init_from or saved.model_dir
    datasets = build_datasets(saved)
    model = build_model(saved, build_learner(saved))
    baseline = baseline_inner_lr = None
    results_path = os.path.join(weights_dir, RESULTS)
    baseline_path = os.path.join(weights_dir, BASELINE_WEIGHTS)
    if os.path.exists(baseline_path) and os.path.exists(results_path):
        with open(results_path) as f:
            baseline_inner_lr = json.load(f).get("baseline_inner_lr")
        if baseline_inner_lr:
            baseline = build_model(saved, build_learner(saved), baseline_inner_lr)
            baseline.learner.load_weights(baseline_path)
    make_dir(saved.model_dir, "model_dir")
    results_name = EVAL_RESULTS if split == "test" else VAL_RESULTS
    return _finish(
        saved, model, datasets, None, baseline, baseline_inner_lr, results_name, weights_dir, split
    )


def validate(config):
    """Evaluates a saved θ on the run's fixed validation tasks, as training validates each epoch.

    The tasks are the `val_tasks` drawn with `eval_seed` that chose the run's best save, so the
    query accuracy (the loss for regression) after `eval_inner_steps` steps of the best weights
    is that save's validation score: a check that a run, a copy of it or a pretrained model
    still gives the figure it was selected by, on this machine and data. Usage:

        python main.py --mode=validate --model_dir=runs/omniglot_20w5s --data_dir=DIR

    Returns:
      `RunResult` over the validation tasks (`test` holds their curves), also written to
      `MODEL_DIR/val_results.json`.

    Raises:
      UserError: as `evaluate`.
    """
    return evaluate(config, split="val")


def saved_config(directory, flag=None):
    """The resolved config of the run or pretrained model in `directory`.

    Raises:
      UserError: no `config.json` there (naming `--flag` when the directory came from one), or
        one that is not a maml_tf config.
    """
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(path):
        where = f"--{flag}={directory}" if flag else directory
        raise UserError(f"{where}: no trained run or model here ({path} is missing)")
    try:
        return Config.load(path).resolve()
    except (ValueError, TypeError, KeyError) as error:
        raise UserError(f"{path}: not a maml_tf config ({error})") from None


# Fields that only say where a run's files go or how it talks; never compared with a saved run.
_PLUMBING = ("model_dir", "init_from", "export_dir", "overwrite", "allow_changed")


def _saved_run(config):
    """The config of the saved run to meta-test or export, with `EVAL_OVERRIDES` from `config`.

    The run is `config.init_from` if set, else `config.model_dir`. A hyperparameter set in
    `config` (not None) that differs from the saved one is an error rather than silently
    ignored: the saved model cannot change, say, its number of ways.
    """
    flag, directory = (
        ("init_from", config.init_from) if config.init_from else ("model_dir", config.model_dir)
    )
    saved = saved_config(directory, flag)
    for field in dataclasses.fields(Config):
        name, asked = field.name, getattr(config, field.name)
        if name in EVAL_OVERRIDES or name in _PLUMBING or field.default is not None:
            continue
        if asked is not None and asked != getattr(saved, name):
            raise UserError(
                f"--{name}={asked}: the model in --{flag}={directory} was trained with "
                f"{name}={getattr(saved, name)}"
            )
    overrides = {
        name: getattr(config, name) for name in EVAL_OVERRIDES if getattr(config, name) is not None
    }
    return dataclasses.replace(
        saved, model_dir=config.model_dir, init_from=config.init_from, **overrides
    ).resolve()


def export_run(config):
    """Writes the run in `config.model_dir` as a SavedModel (see `maml_tf.export`).

    The weights are those `config.checkpoint` names (best by default); `adapt_and_predict`
    takes the run's `eval_inner_steps` (or `--eval_inner_steps`) steps of size α.

    Returns:
      `export.Export`.

    Raises:
      UserError: no run in `model_dir`, or `export_dir` exists and `overwrite` is False.
    """
    saved = _saved_run(config)
    model = build_model(saved, build_learner(saved))
    load_weights(saved, model, saved.init_from or saved.model_dir)
    export_dir = config.export_dir or os.path.join(saved.model_dir, EXPORT_DIR)
    return export.export_model(model, export_dir, overwrite=config.overwrite)


def summary(result):
    """The text `main.py` prints at the end of a run: the adaptation table and the files."""
    config = result.config
    metric = "accuracy (%)" if config.classification else "MSE"
    columns = {}

    def add(title, test):
        if config.classification:
            columns[title] = (100 * test.accuracy_mean, 100 * test.accuracy_ci)
        else:
            columns[title] = (test.loss_mean, test.loss_ci)

    add(f"MAML query {metric}", result.test)
    if result.baseline_test is not None:
        add(f"pretrained (α={result.baseline_inner_lr}) {metric}", result.baseline_test)
    if config.classification:
        queries = "query" if config.n_query == 1 else "queries"
        task = f"{config.n_way}-way {config.k_shot}-shot, {config.n_query} {queries} per class"
    else:
        task = f"K={config.k_shot}, {config.n_query} query points"
    validation = result.protocol.get("tasks") == "val"
    lines = [
        f"{'Validation' if validation else 'Meta-test'} on {result.test.num_tasks} fixed "
        f"{'validation ' if validation else ''}tasks ({config.dataset}, {task}, "
        f"α={config.inner_lr}, weights {result.protocol['weights']}), "
        "mean ± 95% CI after each inner step:",
        evaluation.format_table(columns, digits=2 if config.classification else 4),
    ]
    if result.train_seconds is not None:
        lines.append(f"meta-training: {config.train_steps} steps in {result.train_seconds:.0f} s")
    name = "validation" if validation else "meta-test"
    lines.append(f"{name}: {result.test.num_tasks} tasks in {result.test_seconds:.0f} s")
    if result.figure_path:
        lines.append(f"plot: {result.figure_path}")
    if result.train_seconds is not None:
        lines.append(f"SavedModel: {os.path.join(config.model_dir, EXPORT_DIR)}")
    lines.append(f"results: {config.model_dir}")
    return "\n".join(lines)
