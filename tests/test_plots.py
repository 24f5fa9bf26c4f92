"""Validation curves read back from TensorBoard event files, as a resumed run leaves them."""

import os
import time

import numpy as np
import pytest
import tensorflow as tf
from cli import run_module, stderr_tail

from maml_tf import plots
from maml_tf.errors import UserError


def _write(directory, points):
    writer = tf.summary.create_file_writer(str(directory))
    with writer.as_default():
        for step, value in points:
            tf.summary.scalar(plots.VALIDATION_ACCURACY_TAG, value, step=step)
            tf.summary.scalar("evaluation_query_loss_vs_iterations", 1 - value, step=step)
    writer.close()


@pytest.mark.parametrize("older_touched_last", [False, True], ids=["as_written", "as_cloned"])
def test_a_resumed_run_reads_as_one_curve_with_the_later_resumes_values(
    tmp_path, older_touched_last
):
    """A clone or a copy sets the files' modification times in any order; the start time in
    each file's name says which resume came later."""
    validation = tmp_path / "run" / "logs" / "validation"
    _write(validation, [(1000, 0.90), (2000, 0.93)])
    time.sleep(1.1)  # the names' start times are in whole seconds
    _write(validation, [(2000, 0.94), (3000, 0.96)])
    if older_touched_last:
        older, _ = sorted(validation.glob("events.out.tfevents.*"))
        later = time.time() + 100
        os.utime(older, (later, later))

    iterations, accuracy = plots.read_validation_curve(tmp_path / "run")

    np.testing.assert_array_equal(iterations, [1000, 2000, 3000])
    np.testing.assert_allclose(accuracy, [0.90, 0.94, 0.96], rtol=1e-6)


def test_validation_curves_draw_every_run(tmp_path):
    for name in ("a", "b"):
        _write(tmp_path / name / "logs" / "validation", [(1000, 0.5), (2000, 0.7)])
    path = plots.validation_curves(
        str(tmp_path / "curves.png"), {"A": tmp_path / "a", "B": tmp_path / "b"}
    )
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path == str(tmp_path / "curves.png")


def test_a_run_without_validation_logs_is_named(tmp_path):
    with pytest.raises(UserError, match="empty: no evaluation_query_accuracy_vs_iterations"):
        plots.validation_curves(str(tmp_path / "x.png"), {"empty": tmp_path / "empty"})


def test_the_command_draws_a_run_and_names_a_run_without_logs_in_its_last_line(tmp_path):
    _write(tmp_path / "a" / "logs" / "validation", [(1000, 0.5), (2000, 0.7)])
    drawn = run_module("maml_tf.plots", tmp_path / "a.png", f"A={tmp_path / 'a'}")
    assert drawn.returncode == 0, stderr_tail(drawn)
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    failed = run_module("maml_tf.plots", tmp_path / "b.png", f"empty={tmp_path / 'empty'}")
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    # Last, after whatever TensorFlow prints at start-up.
    assert failed.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'empty'}: no evaluation_query_accuracy_vs_iterations "
        "in its logs/validation"
    )
    assert not (tmp_path / "b.png").exists()
