"""A run's progress read back from its saves and validation logs."""

import keras
import pytest
import tensorflow as tf
from cli import run_module, stderr_tail

from maml_tf import checkpoints, learners, plots, progress
from maml_tf.errors import UserError
from maml_tf.maml import MAML


def _state(model_dir):
    keras.utils.set_random_seed(0)
    model = MAML(learners.mlp(), inner_lr=0.01, inner_steps=1)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    directory = model_dir / checkpoints.CHECKPOINT_DIR / "maml"
    return model, checkpoints.TrainingState(str(directory), model, keep=3)


def _save(model, state, meta_updates, train_seconds, best=False):
    model.optimizer.iterations.assign(meta_updates)
    state.train_seconds.assign(train_seconds)
    if best:
        state.best_score.assign(0.5 + meta_updates / 1000)
        state.save_best()
    state.save()


def _validation(model_dir, points):
    writer = tf.summary.create_file_writer(str(model_dir / "logs" / "validation"))
    with writer.as_default():
        for step, value in points:
            tf.summary.scalar(plots.VALIDATION_ACCURACY_TAG, value, step=step)
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
    assert [line.split() for line in lines[7:]] == [["250", "75.00%"], ["500", "80.00%"]]


def test_a_directory_without_saves_is_named(tmp_path):
    _validation(tmp_path, [(250, 0.75)])
    with pytest.raises(UserError, match="no saves under checkpoints/\\*/latest"):
        progress.report(tmp_path)


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
        f"error: {tmp_path / 'empty'}: no saves under checkpoints/*/latest"
    )

    misused = run_module("maml_tf.progress", tmp_path / "run", tmp_path / "empty")
    assert misused.returncode == 2
    assert misused.stderr.strip().splitlines()[-1] == "usage: python -m maml_tf.progress MODEL_DIR"
