"""A run's or a search's progress read back from its saves and validation logs."""

import os
import re

import keras
import pytest
import tensorflow as tf
from cli import ROOT, run_module, stderr_tail

from maml_tf import checkpoints, learners, plots, progress, tuning
from maml_tf.config import Config
from maml_tf.errors import UserError
from maml_tf.maml import MAML


def _state(model_dir, directory=None):
    """A model and its `TrainingState` in `directory` (default: the run's `checkpoints/maml`)."""
    keras.utils.set_random_seed(0)
    model = MAML(learners.mlp(), inner_lr=0.01, inner_steps=1)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    directory = directory or model_dir / checkpoints.CHECKPOINT_DIR / "maml"
    return model, checkpoints.TrainingState(str(directory), model, keep=3)


def _save(model, state, meta_updates, train_seconds, best=False):
    model.optimizer.iterations.assign(meta_updates)
    state.train_seconds.assign(train_seconds)
    if best:
        state.best_score.assign(0.5 + meta_updates / 1000)
        state.save_best()
    state.save()


def _validation(model_dir, points, tag=plots.VALIDATION_ACCURACY_TAG):
    writer = tf.summary.create_file_writer(str(model_dir / "logs" / "validation"))
    with writer.as_default():
        for step, value in points:
            tf.summary.scalar(tag, value, step=step)
    writer.close()


def test_the_speed_is_the_training_time_between_saves_per_meta_update(tmp_path):
    model, state = _state(tmp_path)
    _save(model, state, 200, 600.0)
    _save(model, state, 250, 700.0, best=True)
    _save(model, state, 400, 1000.0)
    _validation(tmp_path, [(250, 0.75), (500, 0.8)])

    lines = progress.report(tmp_path).splitlines()

    rows = [line.split() for line in lines[2:5]]
    assert rows == [
        ["200", "600.0", "0.17"],
        ["250", "700.0", "0.19", "2.00"],
        ["400", "1,000.0", "0.28", "2.00"],
    ]
    assert lines[5] == "  best: 250 meta-updates, validation score 0.7500, 700.0 s"
    assert lines[6] == f"validation, after the last inner step ({tmp_path}/logs/validation):"
    assert [line.split() for line in lines[8:]] == [["250", "75.00%"], ["500", "80.00%"]]


def _config(model_dir, train_steps, steps_per_epoch):
    Config(
        dataset="sinusoid",
        model_dir=str(model_dir),
        train_steps=train_steps,
        steps_per_epoch=steps_per_epoch,
    ).save(model_dir / "config.json")


def test_the_time_left_is_estimated_at_the_mean_speed_since_the_first_kept_save(tmp_path):
    model, state = _state(tmp_path)
    _save(model, state, 200, 600.0)
    _save(model, state, 250, 700.0, best=True)
    _save(model, state, 400, 1300.0)
    _config(tmp_path, train_steps=1000, steps_per_epoch=250)

    lines = progress.report(tmp_path).splitlines()

    # 700 s over 200 meta-updates: 3.50 s each (the last two saves alone would give 4.00).
    assert lines[6:8] == [
        "  left: 600 of 1,000 meta-updates (--train_steps), about 35 min at 3.50 s each since 200",
        "  next validation at 500 meta-updates (every 250, --steps_per_epoch)",
    ]
    assert lines[8].startswith("validation, after the last inner step")


def test_an_estimate_of_an_hour_or_more_is_in_hours(tmp_path):
    model, state = _state(tmp_path)
    _save(model, state, 100, 0.0)
    _save(model, state, 200, 400.0)
    _config(tmp_path, train_steps=1100, steps_per_epoch=100)
    # 900 meta-updates left at 4.00 s each: 3,600 s.
    assert progress.report(tmp_path).splitlines()[4] == (
        "  left: 900 of 1,100 meta-updates (--train_steps), about 1.0 h at 4.00 s each since 100"
    )


def test_one_save_gives_no_estimate_and_a_finished_run_says_so(tmp_path):
    model, state = _state(tmp_path)
    _save(model, state, 500, 1000.0)
    _config(tmp_path, train_steps=1000, steps_per_epoch=500)
    assert progress.report(tmp_path).splitlines()[3:5] == [
        "  left: 500 of 1,000 meta-updates (--train_steps)",
        "  next validation at 1,000 meta-updates (every 500, --steps_per_epoch)",
    ]

    _save(model, state, 1000, 7000.0)
    assert progress.report(tmp_path).splitlines()[4:] == [
        "  all 1,000 meta-updates (--train_steps) done",
        f"validation, after the last inner step ({tmp_path}/logs/validation):",
        "  none logged",
    ]


def test_a_broken_config_is_named(tmp_path):
    model, state = _state(tmp_path)
    _save(model, state, 500, 1000.0)
    (tmp_path / "config.json").write_text('{"train_steps": 1000,')
    with pytest.raises(UserError, match=f"^{tmp_path}/config.json: not a maml_tf config"):
        progress.report(tmp_path)


def test_each_validation_shows_the_accuracy_and_loss_logged_at_its_meta_update(tmp_path):
    model, state = _state(tmp_path)
    _save(model, state, 100, 50.0)
    _validation(tmp_path, [(50, 0.5), (100, 0.75)])
    _validation(tmp_path, [(50, 1.25), (100, 0.5), (150, 0.25)], plots.VALIDATION_LOSS_TAG)

    lines = progress.report(tmp_path).splitlines()

    assert lines[-4].split() == ["meta-updates", "query", "accuracy", "query", "loss"]
    # A regression run logs a loss only.
    assert [line.split() for line in lines[-3:]] == [
        ["50", "50.00%", "1.2500"],
        ["100", "75.00%", "0.5000"],
        ["150", "0.2500"],
    ]
    assert lines[-1].index("0.2500") == lines[-2].index("0.5000")


def test_a_search_reports_each_trial_with_its_saves_and_validations(tmp_path):
    config = Config(
        dataset="sinusoid",
        model_dir=str(tmp_path),
        train_steps=4,
        steps_per_epoch=2,
        val_tasks=5,
        meta_batch_size=2,
        k_shot=5,
        eval_inner_steps=1,
        verbose=0,
    )
    space = tuning.SearchSpace(max_trials=2, inner_lr_range=(1e-3, 1e-1))
    tuning.tune(config, space)

    lines = progress.report(tmp_path / "tuning").splitlines()

    starts = [i for i, line in enumerate(lines) if line.startswith("trial_")]
    assert len(starts) == 2 and len(lines) == 18
    for trial, first in zip(("trial_0", "trial_1"), starts, strict=True):
        latest = tmp_path / "tuning" / "trials" / trial / "checkpoints" / "latest"
        assert lines[first] == f"{trial}: saves in {latest}"
        # Saves at each epoch end; the score is the validation loss.
        assert [line.split()[0] for line in lines[first + 2 : first + 4]] == ["2", "4"]
        assert lines[first + 4].startswith("  best: ")
        validation = tmp_path / "tuning" / "logs" / trial / "validation"
        assert lines[first + 5] == f"  validation, after the last inner step ({validation}):"
        # A regression search logs no accuracy: its column is left out.
        assert lines[first + 6].split() == ["meta-updates", "query", "loss"]
        rows = [line.split() for line in lines[first + 7 : first + 9]]
        assert [row[0] for row in rows] == ["2", "4"] and all(len(row) == 2 for row in rows)
    # The run's directory finds its search in MODEL_DIR/tuning.
    assert progress.report(tmp_path) == "\n".join(lines)


def test_a_directory_without_saves_is_named(tmp_path):
    _validation(tmp_path, [(250, 0.75)])
    with pytest.raises(UserError, match="no saves under checkpoints/\\*/latest \\(a run\\) or"):
        progress.report(tmp_path)


def test_trials_are_in_the_order_of_their_numbers(tmp_path):
    # A search continued with a larger max_trials pads its new ids to more digits.
    for trial, meta_updates in (("trial_10", 30), ("trial_09", 20), ("trial_8", 10)):
        directory = tmp_path / "trials" / trial / checkpoints.CHECKPOINT_DIR
        _save(*_state(tmp_path, directory), meta_updates, 1.0)

    lines = progress.report(tmp_path).splitlines()

    assert [line.split(":")[0] for line in lines if line.startswith("trial_")] == [
        "trial_8",
        "trial_09",
        "trial_10",
    ]


def test_the_command_prints_the_report_and_one_line_for_a_run_without_saves_or_bad_usage(tmp_path):
    model, state = _state(tmp_path / "run")
    _save(model, state, 100, 50.0)
    printed = run_module("maml_tf.progress", tmp_path / "run")
    assert printed.returncode == 0, stderr_tail(printed)
    assert printed.stdout.splitlines()[2].split() == ["100", "50.0", "0.01"]
    assert printed.stdout.splitlines()[-1] == "  none logged"

    failed = run_module("maml_tf.progress", tmp_path / "empty")
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert failed.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'empty'}: no saves under checkpoints/*/latest (a run) or "
        "trials/trial_*/checkpoints/latest (a search, in MODEL_DIR/tuning by default)"
    )

    misused = run_module("maml_tf.progress", tmp_path / "run", tmp_path / "empty")
    assert misused.returncode == 2
    assert misused.stderr.strip().splitlines()[-1] == (
        "usage: python -m maml_tf.progress MODEL_DIR|TUNE_DIR"
    )


def test_the_readme_example_is_what_the_command_prints_for_the_committed_run(monkeypatch):
    """README's `progress` example is copied by hand each time the unfinished run goes on: a copy
    left behind by a continued run must fail here, not mislead a reader."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        example = re.search(r"```\n\$ python -m maml_tf\.progress (\S+)\n(.*?)```", f.read(), re.S)
    shown = example.group(2).splitlines()
    monkeypatch.chdir(ROOT)  # the example names the run relative to the checkout
    printed = progress.report(example.group(1)).splitlines()
    # "  ..." stands for the validations between the first and the last.
    gap = shown.index("  ...")
    assert printed[:gap] == shown[:gap]
    assert printed[len(printed) - (len(shown) - gap - 1) :] == shown[gap + 1 :]
