"""Tiny hyperparameter searches on sinusoid tasks: each tuner, resuming, failures, divergence."""

import dataclasses
import glob
import json
import os
import signal

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags as absl_flags
from cli import run_main, stderr_tail
from tfevents import events, hparams_data
from weights import weight_arrays

import flags
from maml_tf import tuning
from maml_tf.config import DATASET_FIELDS, TUNING_FIELDS, Config
from maml_tf.errors import Stopped, Terminated, UserError

SPACE = tuning.SearchSpace(
    max_trials=2,
    inner_lr_range=(1e-3, 1e-1),
    outer_lr_range=(1e-4, 1e-2),
    inner_steps_range=(1, 2),
    eval_inner_steps_range=(1, 2),
    tune_first_order=True,
)


def _config(tmp_path, **overrides):
    """Two epochs of two meta-updates of two tasks per trial, five validation tasks."""
    values = {
        "dataset": "sinusoid",
        "model_dir": str(tmp_path),
        "train_steps": 4,
        "steps_per_epoch": 2,
        "val_tasks": 5,
        "meta_batch_size": 2,
        "k_shot": 5,
        "eval_inner_steps": 1,
        "verbose": 0,
        **overrides,
    }
    return Config(**values)


def _trials(directory):
    """{trial id: status} of the trials keras-tuner saved."""
    trials = {}
    for path in glob.glob(os.path.join(directory, tuning.PROJECT, "trial_*", "trial.json")):
        with open(path) as f:
            trial = json.load(f)
        trials[trial["trial_id"]] = trial["status"]
    return trials


class _Calls(list):
    """A list with `interrupt` and `exception` attributes."""


@pytest.fixture
def fits(monkeypatch):
    """Records the trial id of every `MamlHyperModel.fit` call; `interrupt` ids raise mid-fit.

    They raise `calls.exception`: KeyboardInterrupt (a second Ctrl-C) unless set otherwise.
    """
    calls = _Calls()
    interrupt = set()
    calls.exception = KeyboardInterrupt
    original = tuning.MamlHyperModel.fit

    class Interrupt(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            raise calls.exception

    def fit(self, hp, model, trial_id, callbacks=(), **kwargs):
        calls.append(trial_id)
        if trial_id in interrupt:
            callbacks = [*callbacks, Interrupt()]
        return original(self, hp, model, trial_id, callbacks=callbacks, **kwargs)

    monkeypatch.setattr(tuning.MamlHyperModel, "fit", fit)
    calls.interrupt = interrupt
    return calls


def _parse_flagfile(path):
    flag_values = absl_flags.FlagValues()
    flags.define_flags(flag_values)
    flag_values(["main.py", f"--flagfile={path}"])
    return flag_values


@pytest.mark.parametrize(
    "space",
    [
        dataclasses.replace(SPACE, tuner="random"),
        # One random trial, then the Gaussian process picks the second.
        dataclasses.replace(SPACE, tuner="bayesian", initial_points=1),
        # max_epochs is 2 (4 meta-updates / 2 per epoch): with η = 2 two trials of one epoch,
        # then the better one continued for a second epoch.
        dataclasses.replace(SPACE, tuner="hyperband", hyperband_factor=2, max_trials=3),
    ],
    ids=lambda space: space.tuner,
)
def test_each_tuner_writes_the_best_trial_as_a_flagfile(tmp_path, space):
    result = tuning.tune(_config(tmp_path), space)

    directory = str(tmp_path / "tuning")
    assert result.directory == directory
    assert _trials(directory) == {str(i): "COMPLETED" for i in range(space.max_trials)}
    parsed = _parse_flagfile(result.flagfile)
    assert result.flagfile == os.path.join(directory, "best.flags")
    assert parsed.dataset == "sinusoid" and parsed.k_shot == 5 and parsed.meta_batch_size == 2
    # It runs as it is: no flag in it is refused for the data set.
    assert flags.to_config(parsed).resolve().dataset == "sinusoid"
    with open(result.flagfile) as f:
        text = f.read()
    # A sinusoid search's flagfile carries no flag that only image data sets read (--split,
    # --resample, ...).
    image_only = [
        name for name, (readers, _) in DATASET_FIELDS.items() if "sinusoid" not in readers
    ]
    assert image_only and not [name for name in image_only if f"--{name}=" in text]
    for name, value in result.best_hyperparameters.items():
        assert parsed[name].value == value, name
    assert 1e-3 <= result.best_hyperparameters["inner_lr"] <= 1e-1
    assert result.best_hyperparameters["inner_steps"] in (1, 2)
    scores = [float(row.split("|")[8]) for row in result.trials_table.splitlines()[2:]]
    assert result.best_score == pytest.approx(min(scores), rel=1e-3)
    assert result.trials_table.count(", best |") == 1
    with open(os.path.join(directory, "trials.md")) as f:
        assert f.read() == result.trials_table
    if space.tuner == "hyperband":
        assert "2 (from trial " in result.trials_table


def test_trials_are_logged_for_tensorboard_scalars_and_hparams(tmp_path):
    tuning.tune(_config(tmp_path), dataclasses.replace(SPACE, max_trials=1))

    summaries = [(run, value) for run, _, value in events(tmp_path / "tuning" / "logs")]
    logged = {(run, v.tag, v.metadata.plugin_data.plugin_name) for run, v in summaries}
    assert (".", "_hparams_/experiment", "hparams") in logged
    assert ("trial_0", "_hparams_/session_start_info", "hparams") in logged
    tags = {(run, tag) for run, tag, _ in logged}
    assert ("trial_0/validation", "epoch_query_loss") in tags
    assert ("trial_0/train", "epoch_query_loss") in tags
    # Each metric of the search's experiment is logged in its group, and a regression search
    # lists no accuracy, which it never logs.
    (value,) = [v for run, v in summaries if (run, v.tag) == (".", "_hparams_/experiment")]
    metrics = hparams_data(value).experiment.metric_infos
    assert sorted((m.name.group, m.name.tag) for m in metrics) == [
        ("train", "epoch_query_loss"),
        ("validation", "epoch_query_loss"),
    ]
    for metric in metrics:
        assert (f"trial_0/{metric.name.group}", metric.name.tag) in tags


def test_a_rerun_search_continues_without_repeating_finished_trials(tmp_path, fits):
    config = _config(tmp_path)
    tuning.tune(config, SPACE)
    assert fits == ["0", "1"]

    result = tuning.tune(config, dataclasses.replace(SPACE, max_trials=3))

    assert fits == ["0", "1", "2"]
    assert _trials(result.directory) == {"0": "COMPLETED", "1": "COMPLETED", "2": "COMPLETED"}
    assert result.trials_table.count("| completed") == 3
    # A finished search run again trains nothing and gives the same result.
    assert tuning.tune(config, dataclasses.replace(SPACE, max_trials=3)) == result

    # keras-tuner would keep the old space silently; the search refuses a changed one.
    with pytest.raises(UserError, match=r"--inner_lr_range=\[0.01, 0.1\] \(the search used"):
        tuning.tune(config, dataclasses.replace(SPACE, inner_lr_range=(0.01, 0.1)))
    with pytest.raises(UserError, match=r"--k_shot=4 \(the search used 5\)"):
        tuning.tune(_config(tmp_path, k_shot=4), SPACE)
    assert fits == ["0", "1", "2"]


# Terminated: a second SIGTERM, in a process that called errors.raise_on_sigterm (main.py).
@pytest.mark.parametrize("exception", [KeyboardInterrupt, Terminated])
def test_an_interrupted_trial_is_run_again_and_finished_ones_are_kept(tmp_path, fits, exception):
    config = _config(tmp_path)
    fits.interrupt.add("1")
    fits.exception = exception
    with pytest.raises(exception):
        tuning.tune(config, SPACE)
    assert fits == ["0", "1"]
    assert _trials(str(tmp_path / "tuning")) == {"0": "COMPLETED", "1": "RUNNING"}

    fits.interrupt.clear()
    result = tuning.tune(config, SPACE)

    assert fits == ["0", "1", "1"]
    assert _trials(result.directory) == {"0": "COMPLETED", "1": "COMPLETED"}
    # The re-run trial's TensorBoard logs replace those of the interrupted run.
    train_logs = os.path.join(result.directory, "logs", "trial_1", "train")
    assert len(os.listdir(train_logs)) == 1


class _AtBatchEnd(keras.callbacks.Callback):
    """Counts a trial's meta-updates; raises `signum` after the `at`-th (never if None)."""

    def __init__(self, counts, at=None, signum=signal.SIGTERM):
        super().__init__()
        self.counts, self.at, self.signum = counts, at, signum

    def on_train_batch_end(self, batch, logs=None):
        self.counts.append(batch)
        if len(self.counts) == self.at:
            signal.raise_signal(self.signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_trial_continues_from_its_save_and_scores_as_if_never_stopped(
    tmp_path, monkeypatch, signum
):
    # Three epochs of two meta-updates; the signal comes after trial 1's third, mid-epoch,
    # one whole epoch (and its score) after its start.
    overrides = {"train_steps": 6, "steps_per_epoch": 2, "checkpoint_every": 4}
    whole = tuning.tune(_config(tmp_path / "whole", **overrides), SPACE)

    counts = {}
    stop_at = {"1": 3}
    original = tuning.MamlHyperModel.fit

    def fit(self, hp, model, trial_id, callbacks=(), **kwargs):
        counts[trial_id] = counts.get(trial_id, [])
        probe = _AtBatchEnd(counts[trial_id], stop_at.pop(trial_id, None), signum)
        return original(self, hp, model, trial_id, callbacks=[*callbacks, probe], **kwargs)

    monkeypatch.setattr(tuning.MamlHyperModel, "fit", fit)
    config = _config(tmp_path / "stopped", **overrides)
    with pytest.raises(Stopped) as raised:
        tuning.tune(config, SPACE)

    trial_dir = tmp_path / "stopped" / "tuning" / "trials" / "trial_1"
    name = signal.Signals(signum).name
    assert str(raised.value) == (
        f"{name} during trial 1, after its meta-update 3: saved in {trial_dir}; run the same "
        "command again to continue the search from there"
    )
    assert raised.value.signum == signum
    # Saved at the meta-update it stopped at, not only at the periodic save (4).
    assert os.path.basename(tf.train.latest_checkpoint(trial_dir / "checkpoints" / "latest")) == (
        "ckpt-3"
    )
    assert _trials(str(tmp_path / "stopped" / "tuning")) == {"0": "COMPLETED", "1": "RUNNING"}
    assert [len(c) for c in counts.values()] == [6, 3]

    resumed = tuning.tune(config, SPACE)

    # Only the three meta-updates it had left; then the same scores, epoch by epoch.
    assert [len(c) for c in counts.values()] == [6, 6]
    assert _trials(resumed.directory) == {"0": "COMPLETED", "1": "COMPLETED"}

    def history(run):
        return json.loads(
            (tmp_path / run / "tuning" / "trials" / "trial_1" / "history.json").read_text()
        )

    assert history("stopped").keys() == history("whole").keys() == {"0", "1", "2"}
    for epoch, logs in history("whole").items():
        # The training means of the split epoch cover only its meta-update after the stop.
        scores = {name: value for name, value in logs.items() if name.startswith("val_")}
        assert scores and history("stopped")[epoch] == pytest.approx(
            logs if epoch != "1" else history("stopped")[epoch] | scores, rel=1e-5
        ), epoch
    assert resumed.best_hyperparameters == whole.best_hyperparameters
    assert resumed.best_score == pytest.approx(whole.best_score, rel=1e-5)
    # keras-tuner's weights of the trial's best epoch (what hyperband continues from).
    best_weights = [
        weight_arrays(tmp_path / run / "tuning" / "trials" / "trial_1" / "checkpoint.weights.h5")
        for run in ("whole", "stopped")
    ]
    assert [name for name, _ in best_weights[0]] == [name for name, _ in best_weights[1]]
    for (name, expected), (_, got) in zip(*best_weights, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=name)


def test_a_continued_trial_replaces_its_best_epoch_weights_only_with_a_better_epoch(
    tmp_path, monkeypatch
):
    overrides = {"train_steps": 6, "steps_per_epoch": 2, "checkpoint_every": 4}
    config = _config(tmp_path, **overrides)
    space = dataclasses.replace(SPACE, max_trials=1)
    original = tuning.MamlHyperModel.fit
    stop_at = [3]

    def fit(self, hp, model, trial_id, callbacks=(), **kwargs):
        probe = _AtBatchEnd([], stop_at.pop() if stop_at else None)
        return original(self, hp, model, trial_id, callbacks=[*callbacks, probe], **kwargs)

    monkeypatch.setattr(tuning.MamlHyperModel, "fit", fit)
    with pytest.raises(Stopped):
        tuning.tune(config, space)
    trial_dir = tmp_path / "tuning" / "trials" / "trial_0"
    # Epoch 0, before the stop, made unbeatable: no epoch after the stop may replace its
    # weights, as none would in a search that was never stopped.
    history = json.loads((trial_dir / "history.json").read_text())
    assert list(history) == ["0"]
    history["0"]["val_query_loss"] = 0.0
    (trial_dir / "history.json").write_text(json.dumps(history))
    before = weight_arrays(trial_dir / "checkpoint.weights.h5")

    result = tuning.tune(config, space)

    assert result.best_score == 0.0
    after = weight_arrays(trial_dir / "checkpoint.weights.h5")
    assert [name for name, _ in after] == [name for name, _ in before]
    for (name, expected), (_, got) in zip(before, after, strict=True):
        np.testing.assert_array_equal(got, expected, err_msg=name)


def test_a_stop_between_two_trials_ends_the_search_before_the_next_one_begins(
    tmp_path, monkeypatch
):
    whole = tuning.tune(_config(tmp_path / "whole"), SPACE)

    original = tuning.MamlHyperModel.fit
    calls = []

    def fit(self, hp, model, trial_id, **kwargs):
        calls.append(trial_id)
        history = original(self, hp, model, trial_id, **kwargs)
        if trial_id == "0":
            signal.raise_signal(signal.SIGTERM)  # after its last meta-update: between trials
        return history

    monkeypatch.setattr(tuning.MamlHyperModel, "fit", fit)
    config = _config(tmp_path / "stopped")
    with pytest.raises(Stopped) as raised:
        tuning.tune(config, SPACE)

    # Nothing of trial 1 was saved, so the message points at no save.
    assert str(raised.value) == (
        "SIGTERM before trial 1 began: run the same command again to continue the search from there"
    )
    assert raised.value.step is None
    assert calls == ["0", "1"]
    assert _trials(str(tmp_path / "stopped" / "tuning")) == {"0": "COMPLETED", "1": "RUNNING"}
    trial_dir = tmp_path / "stopped" / "tuning" / "trials" / "trial_1"
    assert not (trial_dir / "checkpoints").exists()
    assert not (tmp_path / "stopped" / "tuning" / "logs" / "trial_1").exists()

    resumed = tuning.tune(config, SPACE)

    assert calls == ["0", "1", "1"]
    assert _trials(resumed.directory) == {"0": "COMPLETED", "1": "COMPLETED"}
    assert resumed.best_hyperparameters == whole.best_hyperparameters
    assert resumed.best_score == pytest.approx(whole.best_score, rel=1e-5)


def test_a_trial_whose_save_cannot_be_read_stops_the_search_with_one_line(tmp_path, monkeypatch):
    overrides = {"train_steps": 6, "steps_per_epoch": 2, "checkpoint_every": 4}
    config = _config(tmp_path, **overrides)
    original = tuning.MamlHyperModel.fit
    stop_at = {"1": 3}

    def fit(self, hp, model, trial_id, callbacks=(), **kwargs):
        probe = _AtBatchEnd([], stop_at.pop(trial_id, None))
        return original(self, hp, model, trial_id, callbacks=[*callbacks, probe], **kwargs)

    monkeypatch.setattr(tuning.MamlHyperModel, "fit", fit)
    with pytest.raises(Stopped):
        tuning.tune(config, SPACE)
    trial_dir = tmp_path / "tuning" / "trials" / "trial_1"
    saves = trial_dir / "checkpoints" / "latest"
    for path in saves.glob("ckpt-*"):
        path.write_bytes(b"not a checkpoint")

    with pytest.raises(UserError) as raised:
        tuning.tune(config, SPACE)

    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("trial 1 (α=")
    assert f"{saves}: no checkpoint can be read" in message
    assert message.endswith("move the directory away to start the run over")
    # Not recorded as failed: once the save is moved away, the trial starts over and finishes.
    assert _trials(str(tmp_path / "tuning")) == {"0": "COMPLETED", "1": "RUNNING"}
    assert not (trial_dir / "error.txt").exists()

    os.rename(trial_dir / "checkpoints", tmp_path / "unreadable")
    result = tuning.tune(config, SPACE)

    assert _trials(result.directory) == {"0": "COMPLETED", "1": "COMPLETED"}


def test_a_failing_trial_stops_the_search_naming_it_and_is_run_again(tmp_path, fits, monkeypatch):
    original = tuning.training.build_learner
    builds = []

    def build_learner(config):
        builds.append(config.inner_lr)
        if len(builds) == 2:
            raise ValueError("no learner today\nsecond line")
        return original(config)

    monkeypatch.setattr(tuning.training, "build_learner", build_learner)
    config = _config(tmp_path)
    with pytest.raises(UserError) as raised:
        tuning.tune(config, SPACE)

    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"trial 1 (α={builds[1]:.4g}, β=")
    assert "failed: ValueError: no learner today; traceback in " in message
    error_file = tmp_path / "tuning" / "trials" / "trial_1" / "error.txt"
    assert "Traceback" in error_file.read_text()
    assert fits == ["0"]

    monkeypatch.setattr(tuning.training, "build_learner", original)
    result = tuning.tune(config, SPACE)

    assert fits == ["0", "1"]
    assert _trials(result.directory) == {"0": "COMPLETED", "1": "COMPLETED"}
    assert not error_file.exists()


def test_a_trial_that_keras_tuner_fails_stops_the_search(tmp_path, monkeypatch):
    def fit(self, hp, model, trial_id, **kwargs):
        history = keras.callbacks.History()
        history.history = {"query_loss": [1.0]}  # no val_query_loss, the objective
        return history

    monkeypatch.setattr(tuning.MamlHyperModel, "fit", fit)
    with pytest.raises(UserError) as raised:
        tuning.tune(_config(tmp_path), SPACE)

    assert str(raised.value).startswith("trial 0 (α=")
    assert "failed: KeyError: 'val_query_loss'; traceback in " in str(raised.value)
    assert str(raised.value).endswith("goes on with other trials (trial 0 stays failed)")
    assert _trials(str(tmp_path / "tuning")) == {"0": "FAILED"}


def test_diverged_trials_are_recorded_and_a_search_without_a_score_is_an_error(tmp_path):
    space = dataclasses.replace(SPACE, inner_lr_range=(1e30, 1e31))
    with pytest.raises(UserError, match="no trial of the search in .* completed .*diverged"):
        tuning.tune(_config(tmp_path), space)

    directory = tmp_path / "tuning"
    assert _trials(str(directory)) == {"0": "FAILED", "1": "FAILED"}
    table = (directory / "trials.md").read_text()
    assert table.count("| diverged: meta-update ") == 2
    assert not (directory / "best.flags").exists()


def test_search_space_checks_its_ranges():
    with pytest.raises(UserError, match=r"--inner_lr_range=0.1,0.01: needs 0 < LOW <= HIGH"):
        tuning.SearchSpace(inner_lr_range=(0.1, 0.01))
    with pytest.raises(UserError, match=r"--outer_lr_range=0.0,0.1"):
        tuning.SearchSpace(outer_lr_range=(0, 0.1))
    with pytest.raises(UserError, match=r"--inner_steps_range=0,2: needs 1 <= LOW <= HIGH"):
        tuning.SearchSpace(inner_steps_range=(0, 2))
    with pytest.raises(UserError, match="--tuner=grid"):
        tuning.SearchSpace(tuner="grid")
    assert tuning.SearchSpace(eval_inner_steps_range=["0", "3"]).eval_inner_steps_range == (0, 3)


def test_search_space_defaults_come_from_the_config():
    config = Config(dataset="sinusoid", model_dir="runs/x", first_order=True).resolve()
    space = tuning.SearchSpace().resolve(config)

    assert space.directory == os.path.join("runs/x", "tuning")
    assert space.inner_lr_range == pytest.approx((0.001, 0.1))
    assert space.outer_lr_range == pytest.approx((1e-4, 1e-2))
    assert space.inner_steps_range == (1, 1)
    assert space.eval_inner_steps_range == (10, 10)
    assert space.searched == 2 and SPACE.resolve(config).searched == 5


def test_search_space_from_the_config_tuning_fields():
    config = Config(
        tuner="hyperband",
        max_trials=7,
        tune_dir="/tmp/t",
        inner_lr_range=["0.1", "1.0"],  # as absl's list flags give them
        inner_steps_range=["1", "5"],
        tune_first_order=True,
        hyperband_factor=2,
    )
    space = tuning.SearchSpace.from_config(config)

    assert space == tuning.SearchSpace(
        tuner="hyperband",
        max_trials=7,
        directory="/tmp/t",
        inner_lr_range=(0.1, 1.0),
        inner_steps_range=(1, 5),
        tune_first_order=True,
        hyperband_factor=2,
    )


def test_search_space_has_a_field_for_each_tuning_flag():
    # A tuning flag added to Config but not to SearchSpace would be silently ignored.
    fields = {field.name for field in dataclasses.fields(tuning.SearchSpace)}
    expected = {"directory" if name == "tune_dir" else name for name in TUNING_FIELDS}
    assert fields == expected


def test_main_tune_mode_writes_a_flagfile_that_main_trains_from(tmp_path):
    common = [
        "--train_steps=4",
        "--steps_per_epoch=2",
        "--val_tasks=5",
        "--meta_batch_size=2",
        "--eval_inner_steps=1",
        "--verbose=0",
    ]
    tuned = run_main(
        "--mode=tune",
        "--max_trials=2",
        "--inner_lr_range=0.001,0.01",
        *common,
        f"--model_dir={tmp_path}/search",
    )
    assert tuned.returncode == 0, stderr_tail(tuned)
    flagfile = tmp_path / "search" / "tuning" / "best.flags"
    assert str(flagfile) in tuned.stdout
    trained = run_main(
        f"--flagfile={flagfile}",
        *common,
        "--test_tasks=5",
        "--nobaseline",
        f"--model_dir={tmp_path}/final",
    )
    assert trained.returncode == 0, stderr_tail(trained)
    best = tuning_best_inner_lr(flagfile)
    saved = json.loads((tmp_path / "final" / "config.json").read_text())
    assert saved["inner_lr"] == pytest.approx(best)


def tuning_best_inner_lr(flagfile):
    for line in flagfile.read_text().splitlines():
        if line.startswith("--inner_lr="):
            return float(line.split("=", 1)[1])
    raise AssertionError(f"no --inner_lr in {flagfile}")


def test_a_search_saved_before_rotation_existed_continues_with_classes(tmp_path):
    def config(rotation):
        return Config(
            dataset="omniglot", model_dir=str(tmp_path), rotation=rotation, max_trials=2
        ).resolve()

    space = tuning.SearchSpace().resolve(config("classes"))
    tuning._check_same_search(config("classes"), space)
    # As an omniglot search wrote search.json before the field existed, with a trial started.
    path = os.path.join(space.directory, tuning.SEARCH_FILE)
    with open(path) as f:
        saved = json.load(f)
    del saved["config"]["rotation"]
    with open(path, "w") as f:
        json.dump(saved, f)
    os.makedirs(os.path.join(space.directory, tuning.PROJECT))
    with open(os.path.join(space.directory, tuning.PROJECT, "oracle.json"), "w") as f:
        f.write("{}")

    tuning._check_same_search(config("classes"), space)
    with pytest.raises(UserError, match=r"--rotation=episode \(the search used classes\)"):
        tuning._check_same_search(config("episode"), space)
