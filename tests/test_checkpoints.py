"""Training state that survives SIGKILL and SIGTERM: resuming gives the uninterrupted run."""

import collections
import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from cli import ROOT, run_main, run_script, stderr_tail
from tfevents import events
from weights import weight_arrays

from maml_tf import checkpoints, learners, monitoring, training
from maml_tf.config import Config
from maml_tf.data import sinusoid
from maml_tf.errors import UserError
from maml_tf.maml import MAML

TRAIN_STEPS = 600
STEPS_PER_EPOCH = 200
RUN_FLAGS = (
    f"--train_steps={TRAIN_STEPS}",
    f"--steps_per_epoch={STEPS_PER_EPOCH}",
    "--checkpoint_every=50",
    "--val_tasks=10",
    "--test_tasks=20",
    "--eval_inner_steps=2",
    "--nobaseline",
    "--verbose=0",
)
# Resumed and uninterrupted runs agree bit for bit on this machine; the tolerance leaves room
# for a different summation order of float32 reductions on another CPU.
WEIGHT_ATOL = 1e-6


def latest_step(model_dir):
    state = tf.train.get_checkpoint_state(
        os.path.join(model_dir, checkpoints.CHECKPOINT_DIR, "maml", "latest")
    )
    if state is None:
        return None
    return int(state.model_checkpoint_path.rsplit("-", 1)[1])


def saved_iterations(model_dir):
    latest = os.path.join(model_dir, checkpoints.CHECKPOINT_DIR, "maml", checkpoints.LATEST)
    return checkpoints.read_saves(latest)[-1].meta_updates


def signal_after_first_save(model_dir, log_path, signum):
    """Starts a training run, sends it `signum` as soon as its first save is on disk and waits.

    Returns:
      The process's return code.
    """
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "main.py"), *RUN_FLAGS, f"--model_dir={model_dir}"],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 300
        while latest_step(model_dir) is None:
            assert process.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.02)
        process.send_signal(signum)
        process.wait(timeout=300)
    return process.returncode


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    killed, uninterrupted = root / "killed", root / "uninterrupted"
    terminated = root / "terminated"
    returncode = signal_after_first_save(killed, root / "killed.log", signal.SIGKILL)
    step_at_kill = latest_step(killed)
    # The killed run as another machine gets it: a snapshot copied back into place.
    snapshot = snapshot_run(killed, root / "snapshot")
    shutil.copytree(root / "snapshot", root / "continued")
    continued = run_main(*RUN_FLAGS, f"--model_dir={root / 'continued'}")
    resumed = run_main(*RUN_FLAGS, f"--model_dir={killed}")
    returncode_at_term = signal_after_first_save(
        terminated, root / "terminated.log", signal.SIGTERM
    )
    term_saves = (latest_step(terminated), saved_iterations(terminated))
    # With Keras' per-epoch lines, which the mid-epoch test reads.
    term_resumed = run_main(*RUN_FLAGS, f"--model_dir={terminated}", "--verbose=2")
    reference = run_main(*RUN_FLAGS, f"--model_dir={uninterrupted}")
    return {
        "returncode_at_kill": returncode,
        "step_at_kill": step_at_kill,
        "snapshot": snapshot,
        "snapshot_dir": root / "snapshot",
        "continued": continued,
        "continued_dir": root / "continued",
        "resumed": resumed,
        "reference": reference,
        "killed_dir": killed,
        "reference_dir": uninterrupted,
        "returncode_at_term": returncode_at_term,
        "term_log": (root / "terminated.log").read_text(),
        "term_saves": term_saves,
        "term_resumed": term_resumed,
        "terminated_dir": terminated,
    }


def snapshot_run(run_dir, out_dir):
    return subprocess.run(
        ["bash", os.path.join(ROOT, "scripts", "snapshot_run.sh"), str(run_dir), str(out_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_run_was_killed_mid_training(runs):
    assert runs["returncode_at_kill"] == -signal.SIGKILL
    assert 0 < runs["step_at_kill"] < TRAIN_STEPS


def test_the_resumed_run_finishes(runs):
    for name in ("resumed", "term_resumed", "reference"):
        assert runs[name].returncode == 0, stderr_tail(runs[name])


def test_the_resumed_run_ends_with_the_full_iteration_count(runs):
    assert saved_iterations(runs["killed_dir"]) == TRAIN_STEPS
    assert saved_iterations(runs["reference_dir"]) == TRAIN_STEPS


@pytest.mark.parametrize("name", ["learner.weights.h5", "best.weights.h5"])
@pytest.mark.parametrize("run_dir", ["killed_dir", "terminated_dir"])
def test_the_resumed_run_ends_with_the_uninterrupted_weights(runs, run_dir, name):
    resumed = weight_arrays(runs[run_dir] / name)
    reference = weight_arrays(runs["reference_dir"] / name)
    assert [n for n, _ in resumed] == [n for n, _ in reference]
    for (variable, a), (_, b) in zip(resumed, reference, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=WEIGHT_ATOL, err_msg=variable)


def stopped_lines(text):
    return [line for line in text.splitlines() if line.startswith("stopped:")]


def test_sigterm_stops_the_run_with_one_line_and_the_signal_status(runs):
    log = runs["term_log"]
    assert runs["returncode_at_term"] == 128 + signal.SIGTERM, log[-3000:]
    assert "Traceback" not in log
    step, _ = runs["term_saves"]
    save = runs["terminated_dir"] / checkpoints.CHECKPOINT_DIR / "maml" / "latest" / f"ckpt-{step}"
    assert stopped_lines(log) == [
        f"stopped: SIGTERM after meta-update {step}: saved in {save}; run the same command again "
        "to continue"
    ]


def test_sigterm_saves_the_meta_update_it_stopped_at(runs):
    # The signal is sent once the first periodic save (meta-update 50) exists; the periodic
    # saves alone would leave the run at 50 until meta-update 100.
    step, iterations = runs["term_saves"]
    assert 50 <= step < TRAIN_STEPS
    assert iterations == step


def test_the_run_resumed_after_sigterm_continues_from_its_stop(runs):
    step, _ = runs["term_saves"]
    assert f"after {step} meta-updates" in runs["term_resumed"].stderr
    assert saved_iterations(runs["terminated_dir"]) == TRAIN_STEPS


def test_a_run_resumed_mid_epoch_says_which_epoch_it_finishes(runs):
    step, _ = runs["term_saves"]
    epochs = TRAIN_STEPS // STEPS_PER_EPOCH
    epoch = step // STEPS_PER_EPOCH + 1
    assert step % STEPS_PER_EPOCH, "the stop fell on an epoch's end: nothing to finish"
    assert (
        f"meta-update {step} is part-way through epoch {epoch} of "
        f"{epochs}: its last {STEPS_PER_EPOCH - step % STEPS_PER_EPOCH} meta-updates run first"
    ) in runs["term_resumed"].stderr
    # Keras' own lines count the run's epochs, not the short fit's ("Epoch 1/1").
    shown = re.findall(r"^Epoch (\d+)/(\d+)$", runs["term_resumed"].stdout, re.MULTILINE)
    assert shown == [(str(e), str(epochs)) for e in range(epoch, epochs + 1)]


# A shell without job control starts background commands with SIGINT ignored, and the child
# would inherit that; a terminal's Ctrl-C finds Python's own handler, which this restores.
SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


def signalled_at_meta_test(argv, signum):
    """`main.run()` with `argv`, sending itself `signum` as the meta-test starts."""
    script = f"""
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.argv = {["main.py", *map(str, argv)]!r}
import main
from maml_tf import evaluation
evaluate = evaluation.evaluate
def interrupted(*args, **kwargs):
    signal.raise_signal({int(signum)})
    return evaluate(*args, **kwargs)
evaluation.evaluate = interrupted
main.run()
"""
    return run_script(script)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_eval_is_one_line_and_the_signal_status(runs, signum):
    result = signalled_at_meta_test(["--mode=eval", f"--model_dir={runs['reference_dir']}"], signum)
    assert result.returncode == 128 + signum, stderr_tail(result)
    assert "Traceback" not in result.stderr
    assert stopped_lines(result.stderr) == [
        f"stopped: {SIGNAL_NAMES[signum]} during --mode=eval; nothing was written; run the "
        "same command again to meta-test"
    ]
    assert not (runs["reference_dir"] / training.EVAL_RESULTS).exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_meta_test_after_training_keeps_the_run_and_its_results(
    runs, tmp_path, signum
):
    # A finished run, run again: it restores its last save and goes straight to the meta-test.
    model_dir = tmp_path / "finished"
    shutil.copytree(runs["reference_dir"], model_dir)
    results = (model_dir / training.RESULTS).read_text()
    result = signalled_at_meta_test([*RUN_FLAGS, f"--model_dir={model_dir}"], signum)
    assert result.returncode == 128 + signum, stderr_tail(result)
    assert "Traceback" not in result.stderr
    save = model_dir / checkpoints.CHECKPOINT_DIR / "maml" / "latest" / f"ckpt-{TRAIN_STEPS}"
    assert stopped_lines(result.stderr) == [
        f"stopped: {signal.Signals(signum).name} during the meta-test, after meta-training: its "
        f"{TRAIN_STEPS} meta-updates are saved in {save}; run the same command again to "
        "meta-test and export the run without meta-training it again"
    ]
    assert (model_dir / training.RESULTS).read_text() == results
    assert not list(model_dir.glob("*.partial"))
    again = run_main(*RUN_FLAGS, f"--model_dir={model_dir}")
    assert again.returncode == 0, stderr_tail(again)
    assert saved_iterations(model_dir) == TRAIN_STEPS
    reference = json.loads(results)
    rerun = json.loads((model_dir / training.RESULTS).read_text())
    assert rerun["test"] == reference["test"]
    assert rerun["train_seconds"] == reference["train_seconds"]


def test_a_second_sigterm_during_meta_training_is_one_line_and_keeps_the_saves(runs, tmp_path):
    model_dir = tmp_path / "twice"
    shutil.copytree(runs["snapshot_dir"], model_dir)
    step = latest_step(model_dir)
    # Both signals as the resumed run's first fit starts: the first asks for a stop at the end
    # of the meta-update, the second acts at once.
    script = f"""
import signal, sys
sys.argv = {["main.py", *RUN_FLAGS, f"--model_dir={model_dir}"]!r}
import main
from maml_tf import training
fit_from = training.fit_from
def twice(*args, **kwargs):
    signal.raise_signal(signal.SIGTERM)
    signal.raise_signal(signal.SIGTERM)
    return fit_from(*args, **kwargs)
training.fit_from = twice
main.run()
"""
    result = run_script(script)
    assert result.returncode == 128 + signal.SIGTERM, stderr_tail(result)
    assert "Traceback" not in result.stderr
    assert stopped_lines(result.stderr) == [
        "stopped: SIGTERM during --mode=train; the saves made before it are intact; the same "
        "command run again continues from the newest"
    ]
    assert latest_step(model_dir) == step
    again = run_main(*RUN_FLAGS, f"--model_dir={model_dir}")
    assert again.returncode == 0, stderr_tail(again)
    assert f"after {step} meta-updates" in again.stderr


def test_a_snapshot_holds_only_the_newest_save(runs):
    assert runs["snapshot"].returncode == 0, runs["snapshot"].stderr
    latest = runs["snapshot_dir"] / checkpoints.CHECKPOINT_DIR / "maml" / "latest"
    step = runs["step_at_kill"]
    assert sorted(p.name for p in latest.iterdir()) == sorted(
        ["checkpoint", f"ckpt-{step}.index", f"ckpt-{step}.data-00000-of-00001"]
    )
    assert latest_step(runs["snapshot_dir"]) == step


def test_a_run_continued_from_its_snapshot_ends_with_the_uninterrupted_weights(runs):
    continued = runs["continued"]
    assert continued.returncode == 0, stderr_tail(continued)
    assert f"after {runs['step_at_kill']} meta-updates" in continued.stderr
    assert saved_iterations(runs["continued_dir"]) == TRAIN_STEPS
    for name in ("learner.weights.h5", "best.weights.h5"):
        ours = weight_arrays(runs["continued_dir"] / name)
        reference = weight_arrays(runs["reference_dir"] / name)
        assert [n for n, _ in ours] == [n for n, _ in reference]
        for (variable, a), (_, b) in zip(ours, reference, strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=WEIGHT_ATOL, err_msg=f"{name} {variable}")


def test_a_snapshot_of_a_directory_without_a_run_is_one_error_line(tmp_path):
    result = snapshot_run(tmp_path / "nothing", tmp_path / "out")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nothing'} holds no training run with a save (config.json, "
        f"{tmp_path / 'nothing'}/checkpoints/maml/latest/checkpoint)"
    ]
    assert not (tmp_path / "out").exists()


def test_the_resumed_run_meta_tests_like_the_uninterrupted_one(runs):
    def test_losses(model_dir):
        return json.loads((model_dir / "results.json").read_text())["test"]["query_loss_mean"]

    np.testing.assert_allclose(
        test_losses(runs["killed_dir"]), test_losses(runs["reference_dir"]), rtol=1e-5
    )


def test_the_resumed_run_describes_itself_in_its_logs_once(runs):
    once = ["_hparams_/experiment", "_hparams_/session_start_info", "custom_scalars__config__"]
    for name in ("killed_dir", "reference_dir"):
        counts = collections.Counter(value.tag for _, _, value in events(runs[name] / "logs"))
        assert [counts.get(tag) for tag in once] == [1, 1, 1], name


def test_the_resumed_runs_plot_and_validate_each_epoch_once_as_the_uninterrupted_one(runs):
    # The stop came mid-epoch 0: the resumed process must neither skip that epoch's sinusoid fit
    # plot and validation nor write them twice.
    for name in ("killed_dir", "terminated_dir", "reference_dir"):
        steps = collections.defaultdict(list)
        for run, step, value in events(runs[name] / "logs"):
            if value.tag in (monitoring.SINUSOID_FIT_TAG, "epoch_query_loss"):
                steps[run, value.tag].append(step)
        # Sorted: a resumed process writes new event files, which glob may list first.
        assert {key: sorted(value) for key, value in steps.items()} == {
            (".", monitoring.SINUSOID_FIT_TAG): [0, 1, 2],
            ("train", "epoch_query_loss"): [0, 1, 2],
            ("validation", "epoch_query_loss"): [0, 1, 2],
        }, name


def test_a_finished_run_is_not_trained_again(runs):
    again = run_main(*RUN_FLAGS, f"--model_dir={runs['reference_dir']}")
    assert again.returncode == 0, stderr_tail(again)
    assert saved_iterations(runs["reference_dir"]) == TRAIN_STEPS


def test_a_changed_hyperparameter_is_refused_naming_the_flag(runs):
    result = run_main(*RUN_FLAGS, "--inner_lr=0.02", f"--model_dir={runs['reference_dir']}")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "--inner_lr=0.02" in result.stderr and "--allow_changed=inner_lr" in result.stderr


# ------------------------------------------------------------------- TrainingState, in-process


def small_model(outer_lr=1e-3):
    keras.utils.set_random_seed(0)
    model = MAML(learners.mlp(), inner_lr=0.01, inner_steps=1)
    model.compile(optimizer=keras.optimizers.Adam(outer_lr))
    return model


def save_at(state, model, step, value):
    model.optimizer.iterations.assign(step)
    for variable in model.learner.trainable_variables:
        variable.assign(tf.fill(variable.shape, value))
    state.save()


def test_restore_takes_the_newest_save(tmp_path):
    model = small_model()
    state = checkpoints.TrainingState(tmp_path, model)
    save_at(state, model, 10, 1.0)
    save_at(state, model, 20, 2.0)
    restored = small_model()
    assert checkpoints.TrainingState(tmp_path, restored).restore() == 20
    assert float(restored.learner.trainable_variables[0][0, 0]) == 2.0


def test_an_unreadable_save_falls_back_to_the_previous_one(tmp_path):
    model = small_model()
    state = checkpoints.TrainingState(tmp_path, model)
    save_at(state, model, 10, 1.0)
    save_at(state, model, 20, 2.0)
    data = tmp_path / "latest" / "ckpt-20.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:100])  # truncated, as by a full disk
    restored = small_model()
    assert checkpoints.TrainingState(tmp_path, restored).restore() == 10
    assert float(restored.learner.trainable_variables[0][0, 0]) == 1.0


def test_no_readable_save_is_an_error_not_a_fresh_start(tmp_path):
    model = small_model()
    state = checkpoints.TrainingState(tmp_path, model)
    save_at(state, model, 10, 1.0)
    (tmp_path / "latest" / "ckpt-10.index").write_bytes(b"damaged")
    with pytest.raises(UserError, match="no checkpoint can be read"):
        checkpoints.TrainingState(tmp_path, small_model()).restore()


def test_no_save_means_a_fresh_start(tmp_path):
    assert checkpoints.TrainingState(tmp_path, small_model()).restore() == 0


def test_restore_keeps_the_outer_lr_the_model_was_compiled_with(tmp_path):
    model = small_model(outer_lr=1e-3)
    save_at(checkpoints.TrainingState(tmp_path, model), model, 10, 1.0)
    restored = small_model(outer_lr=1e-4)
    assert checkpoints.TrainingState(tmp_path, restored).restore() == 10
    assert float(restored.optimizer.learning_rate) == pytest.approx(1e-4)
    assert float(restored.learner.trainable_variables[0][0, 0]) == 1.0


def test_a_run_continued_with_another_outer_lr_trains_with_it(runs, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(runs["reference_dir"], run_dir)
    more = run_main(
        *RUN_FLAGS,
        f"--train_steps={TRAIN_STEPS + 200}",
        "--outer_lr=1e-4",
        "--allow_changed=outer_lr",
        f"--model_dir={run_dir}",
    )
    assert more.returncode == 0, stderr_tail(more)
    rates = {
        step: float(tf.make_ndarray(value.tensor))
        for run, step, value in events(run_dir / "logs")
        if run == "train" and value.tag == "epoch_learning_rate"
    }
    assert sorted(rates) == [0, 1, 2, 3]
    assert [rates[epoch] for epoch in (0, 1, 2)] == pytest.approx([1e-3] * 3)
    assert rates[3] == pytest.approx(1e-4)


def test_the_kept_saves_read_back_oldest_first_with_their_training_time(tmp_path):
    model = small_model()
    state = checkpoints.TrainingState(tmp_path, model, keep=3)
    for step, seconds in [(100, 40.0), (200, 90.0), (300, 150.0), (400, 170.0)]:
        state.train_seconds.assign(seconds)
        save_at(state, model, step, 1.0)

    saves = checkpoints.read_saves(tmp_path / checkpoints.LATEST)

    # keep=3: the first save is gone.
    assert [(s.meta_updates, s.train_seconds) for s in saves] == [
        (200, 90.0),
        (300, 150.0),
        (400, 170.0),
    ]
    assert all(math.isnan(s.best_score) for s in saves)
    assert checkpoints.read_saves(tmp_path / checkpoints.BEST) == []


def test_reading_a_damaged_save_names_it(tmp_path):
    model = small_model()
    save_at(checkpoints.TrainingState(tmp_path, model), model, 100, 1.0)
    index = tmp_path / checkpoints.LATEST / "ckpt-100.index"
    index.write_bytes(index.read_bytes()[:10])

    with pytest.raises(UserError, match="ckpt-100: cannot read this save"):
        checkpoints.read_saves(tmp_path / checkpoints.LATEST)


def test_keeps_only_the_last_saves(tmp_path):
    model = small_model()
    state = checkpoints.TrainingState(tmp_path, model, keep=2)
    for step in (1, 2, 3, 4):
        save_at(state, model, step, float(step))
    kept = sorted(p.name for p in (tmp_path / "latest").glob("*.index"))
    assert kept == ["ckpt-3.index", "ckpt-4.index"]


@pytest.mark.parametrize(
    "mode,scores,best", [("max", [0.5, 0.7, 0.6], 0.7), ("min", [0.5, 0.3, 0.4], 0.3)]
)
def test_improved_follows_the_mode(tmp_path, mode, scores, best):
    state = checkpoints.TrainingState(tmp_path, small_model(), mode=mode)
    for score in scores:
        if state.improved(score):
            state.best_score.assign(score)
    assert float(state.best_score.numpy()) == pytest.approx(best)
    assert not state.improved(float("nan"))


def test_weights_are_written_through_a_rename(tmp_path):
    model = small_model()
    path = str(tmp_path / "best.weights.h5")
    checkpoints.atomic_save_weights(model.learner, path)
    assert sorted(os.listdir(tmp_path)) == ["best.weights.h5"]
    restored = small_model()
    for variable in restored.learner.trainable_variables:
        variable.assign(tf.zeros_like(variable))
    restored.learner.load_weights(path)
    for a, b in zip(model.learner.weights, restored.learner.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_the_best_save_carries_its_own_training_time(tmp_path):
    model = small_model()
    state = checkpoints.TrainingState(tmp_path, model)
    callback = checkpoints.SaveTrainingState(state, every_steps=1, monitor="val_score")
    callback.set_model(model)
    callback.set_params({"steps": 2})
    callback.on_train_begin()
    model.optimizer.iterations.assign(1)
    callback.on_train_batch_end(0)  # a save within the epoch
    time.sleep(0.3)
    model.optimizer.iterations.assign(2)
    callback.on_train_batch_end(1)
    callback.on_epoch_end(0, {"val_score": 0.5})

    best = checkpoints.read_saves(tmp_path / checkpoints.BEST)[-1]
    latest = checkpoints.read_saves(tmp_path / checkpoints.LATEST)[-1]
    assert best.meta_updates == latest.meta_updates == 2
    # At least the 0.3 s slept after the save at step 1, whose time the old code reused.
    assert 0.3 <= best.train_seconds <= latest.train_seconds


# ------------------------------------------------------------------ saves that cannot be made


def test_a_save_without_room_on_its_disk_is_refused_before_writing(tmp_path, monkeypatch):
    model = small_model()
    state = checkpoints.TrainingState(tmp_path / "maml", model)
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(checkpoints.SaveError, match="MB free, a save needs about"):
        checkpoints.check_room(tmp_path / "maml", free)
    save_at(state, model, 10, 1.0)
    monkeypatch.setattr(checkpoints, "SAVE_MARGIN_BYTES", free + 1)
    with pytest.raises(checkpoints.SaveError, match=str(tmp_path / "maml" / "latest")):
        save_at(state, model, 20, 2.0)
    monkeypatch.undo()
    assert checkpoints.TrainingState(tmp_path / "maml", small_model()).restore() == 10


def test_a_save_through_a_file_is_one_save_error(tmp_path):
    (tmp_path / "file").write_text("")
    model = small_model()
    with pytest.raises(checkpoints.SaveError, match="cannot write it"):
        checkpoints.TrainingState(tmp_path / "file" / "maml", model).save()
    with pytest.raises(checkpoints.SaveError, match="cannot write it"):
        checkpoints.atomic_save_weights(model.learner, str(tmp_path / "file" / "w.weights.h5"))


def test_training_on_a_full_disk_stops_naming_the_last_save(tmp_path, monkeypatch):
    config = Config(
        model_dir=str(tmp_path / "run"),
        train_steps=20,
        steps_per_epoch=10,
        checkpoint_every=5,
        val_tasks=2,
        test_tasks=2,
        baseline=False,
        verbose=0,
    )
    training.train(dataclasses.replace(config, train_steps=10))
    # As if the disk had filled since: every later save finds no room.
    monkeypatch.setattr(checkpoints, "SAVE_MARGIN_BYTES", shutil.disk_usage(tmp_path).free + 1)
    with pytest.raises(checkpoints.SaveError) as raised:
        training.train(config)
    latest = tmp_path / "run" / checkpoints.CHECKPOINT_DIR / "maml" / "latest"
    assert str(raised.value).endswith(
        f"training stopped at meta-update 15, the last save (meta-update 10, {latest}/ckpt-10) "
        "is intact: make room, then run the same command again to continue from it"
    )
    assert latest_step(tmp_path / "run") == 10


# ------------------------------------------------------------------ stop signals, in-process


@contextlib.contextmanager
def recorded(signum):
    """Installs a handler that records `signum` in the yielded list; restores the old one."""
    calls = []
    previous = signal.signal(signum, lambda number, frame: calls.append(number))
    try:
        yield calls
    finally:
        signal.signal(signum, previous)


def test_a_stop_signal_is_recorded_and_a_second_goes_to_the_handler_from_before():
    with recorded(signal.SIGTERM) as calls:
        with checkpoints.StopRequests() as stop:
            signal.raise_signal(signal.SIGTERM)
            assert (stop.signum, calls) == (signal.SIGTERM, [])
            signal.raise_signal(signal.SIGTERM)
            assert calls == [signal.SIGTERM]
        signal.raise_signal(signal.SIGTERM)
        assert calls == [signal.SIGTERM, signal.SIGTERM]


def test_after_a_stop_signal_the_other_kind_also_goes_to_the_handler_from_before():
    with recorded(signal.SIGINT) as calls, checkpoints.StopRequests() as stop:
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGINT)
        assert (stop.signum, calls) == (signal.SIGTERM, [signal.SIGINT])


def test_leaving_stop_requests_restores_the_handlers_from_before():
    before = [signal.getsignal(s) for s in checkpoints.STOP_SIGNALS]
    with checkpoints.StopRequests():
        assert [signal.getsignal(s) for s in checkpoints.STOP_SIGNALS] != before
    assert [signal.getsignal(s) for s in checkpoints.STOP_SIGNALS] == before


class SignalAtBatchEnd(keras.callbacks.Callback):
    def __init__(self, batch, signum):
        super().__init__()
        self.batch, self.signum = batch, signum

    def on_train_batch_end(self, batch, logs=None):
        if batch == self.batch:
            signal.raise_signal(self.signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_fit_stops_at_the_end_of_the_meta_update_the_signal_came_in(signum):
    model = small_model()
    tasks = sinusoid.task_dataset(5, 5, 2, 0, "train", None)
    with checkpoints.StopRequests() as stop, pytest.raises(checkpoints.StopRequested) as raised:
        model.fit(
            tasks,
            epochs=2,
            steps_per_epoch=10,
            callbacks=[SignalAtBatchEnd(2, signum), checkpoints.StopOnSignal(stop)],
            shuffle=False,
            verbose=0,
        )
    assert (raised.value.signum, raised.value.step) == (signum, 3)
    assert int(model.optimizer.iterations.numpy()) == 3


# ------------------------------------------------------------------------- non-finite losses

NAN_FLAGS = (
    "--steps_per_epoch=50",
    "--checkpoint_every=25",
    "--val_tasks=10",
    "--test_tasks=10",
    "--eval_inner_steps=1",
    "--nobaseline",
    "--verbose=0",
)


@pytest.fixture(scope="module")
def diverged_run(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("nan") / "run"
    good = run_main(*NAN_FLAGS, "--train_steps=100", f"--model_dir={model_dir}")
    assert good.returncode == 0, stderr_tail(good)
    diverged = run_main(
        *NAN_FLAGS,
        "--train_steps=200",
        "--inner_lr=1e6",
        "--allow_changed=inner_lr",
        f"--model_dir={model_dir}",
    )
    return model_dir, diverged


def test_a_non_finite_loss_stops_with_one_line_naming_the_step(diverged_run):
    _, diverged = diverged_run
    assert diverged.returncode == 1
    assert "Traceback" not in diverged.stderr
    assert "meta-update 101" in diverged.stderr and "not finite" in diverged.stderr
    assert "last good save (meta-update 100" in diverged.stderr


def test_the_last_good_save_survives_a_divergence(diverged_run):
    model_dir, _ = diverged_run
    assert latest_step(model_dir) == 100
    path = tf.train.latest_checkpoint(
        os.path.join(model_dir, checkpoints.CHECKPOINT_DIR, "maml", "latest")
    )
    reader = tf.train.load_checkpoint(path)
    for name in reader.get_variable_to_shape_map():
        if name.startswith("learner/"):
            assert np.isfinite(reader.get_tensor(name)).all(), name


def test_a_diverged_run_resumes_with_a_sane_step_size(diverged_run):
    model_dir, _ = diverged_run
    resumed = run_main(
        *NAN_FLAGS,
        "--train_steps=200",
        "--inner_lr=0.01",
        "--allow_changed=inner_lr",
        f"--model_dir={model_dir}",
    )
    assert resumed.returncode == 0, stderr_tail(resumed)
    assert "resumed from" in resumed.stderr and "after 100 meta-updates" in resumed.stderr
    assert saved_iterations(model_dir) == 200
