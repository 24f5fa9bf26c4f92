"""End-to-end runs of `python main.py` in a temporary directory."""

import json
import os
import time

import pytest
from cli import run_main, run_script, stderr_tail

from maml_tf import checkpoints


@pytest.fixture(scope="module")
def sinusoid_run(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("run") / "sinusoid"
    result = run_main(
        "--train_steps=40",
        "--steps_per_epoch=20",
        "--val_tasks=10",
        "--test_tasks=20",
        "--eval_inner_steps=3",
        f"--model_dir={model_dir}",
    )
    return model_dir, result


def test_sinusoid_run_prints_the_adaptation_table(sinusoid_run):
    model_dir, result = sinusoid_run
    assert result.returncode == 0, stderr_tail(result)
    assert "MAML query MSE" in result.stdout and "pretrained" in result.stdout
    rows = [line.split()[0] for line in result.stdout.splitlines() if line[:4].strip().isdigit()]
    assert rows == ["0", "1", "2", "3"]
    assert f"plot: {model_dir}/sinusoid_fit.png" in result.stdout


def test_sinusoid_run_writes_its_files(sinusoid_run):
    model_dir, _ = sinusoid_run
    for name in ("config.json", "learner.weights.h5", "baseline.weights.h5", "sinusoid_fit.png"):
        assert (model_dir / name).exists(), name
    results = json.loads((model_dir / "results.json").read_text())
    assert len(results["test"]["query_loss_mean"]) == 4
    assert results["test"]["num_tasks"] == 20
    assert results["test_seconds"] > 0
    assert results["baseline_inner_lr"] > 0
    events = [f for _, _, files in os.walk(model_dir / "logs") for f in files]
    assert any(f.startswith("events.out.tfevents") for f in events)


def test_eval_mode_reproduces_the_test_numbers(sinusoid_run):
    model_dir, _ = sinusoid_run
    started = time.perf_counter()
    result = run_main("--mode=eval", f"--model_dir={model_dir}", "--test_tasks=20")
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, stderr_tail(result)
    trained = json.loads((model_dir / "results.json").read_text())["test"]
    evaluated = json.loads((model_dir / "eval_results.json").read_text())
    assert evaluated["test"]["query_loss_mean"] == pytest.approx(
        trained["query_loss_mean"], rel=1e-5
    )
    # The meta-test's own time: part of the process's, not the start-up or loading.
    assert 0 < evaluated["test_seconds"] < elapsed
    assert f"meta-test: 20 tasks in {evaluated['test_seconds']:.0f} s" in result.stdout


def _best_score(model_dir):
    (best,) = checkpoints.read_saves(model_dir / checkpoints.CHECKPOINT_DIR / "maml" / "best")
    return best.best_score


def test_validate_mode_gives_the_best_saves_validation_loss_again(sinusoid_run):
    model_dir, _ = sinusoid_run
    result = run_main("--mode=validate", f"--model_dir={model_dir}")
    assert result.returncode == 0, stderr_tail(result)
    validated = json.loads((model_dir / "val_results.json").read_text())
    assert validated["protocol"]["tasks"] == "val" and validated["protocol"]["val_tasks"] == 10
    assert validated["test"]["num_tasks"] == 10
    # The loss after eval_inner_steps steps on the validation tasks is what chose the best save.
    assert validated["test"]["query_loss_mean"][-1] == pytest.approx(
        _best_score(model_dir), rel=1e-5
    )
    assert "Validation on 10 fixed validation tasks" in result.stdout
    assert f"validation: 10 tasks in {validated['test_seconds']:.0f} s" in result.stdout


def test_thread_pool_sizes_change_speed_not_the_test_numbers(sinusoid_run, tmp_path):
    model_dir, _ = sinusoid_run
    result = run_main(
        "--mode=eval",
        f"--init_from={model_dir}",
        f"--model_dir={tmp_path}/threads",
        "--test_tasks=20",
        "--inter_op_threads=2",
        "--intra_op_threads=1",
    )
    assert result.returncode == 0, stderr_tail(result)
    assert "TensorFlow thread pools: inter-op 2, intra-op 1" in result.stderr
    trained = json.loads((model_dir / "results.json").read_text())["test"]
    evaluated = json.loads((tmp_path / "threads" / "eval_results.json").read_text())["test"]
    assert evaluated["query_loss_mean"] == pytest.approx(trained["query_loss_mean"], rel=1e-5)


@pytest.mark.parametrize("onednn", ["on", "off"])
def test_onednn_changes_the_kernels_not_the_test_numbers(sinusoid_run, tmp_path, onednn):
    model_dir, _ = sinusoid_run
    result = run_main(
        "--mode=eval",
        f"--init_from={model_dir}",
        f"--model_dir={tmp_path}/onednn",
        "--test_tasks=20",
        f"--onednn={onednn}",
    )
    assert result.returncode == 0, stderr_tail(result)
    # TensorFlow's own report of the kernels it chose as it loaded.
    assert f"oneDNN kernels: {onednn}" in result.stderr
    trained = json.loads((model_dir / "results.json").read_text())["test"]
    evaluated = json.loads((tmp_path / "onednn" / "eval_results.json").read_text())["test"]
    assert evaluated["query_loss_mean"] == pytest.approx(trained["query_loss_mean"], rel=1e-5)


def test_onednn_after_tensorflow_loaded_is_one_clear_error():
    script = (
        "import os, sys\n"
        "os.environ.pop('TF_ENABLE_ONEDNN_OPTS', None)\n"
        "import tensorflow\n"
        "sys.argv = ['main.py', '--onednn=on']\n"
        "import main\n"
        "main.run()\n"
    )
    result = run_script(script)
    assert result.returncode == 1, stderr_tail(result)
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --onednn=on: TensorFlow was loaded before main.py could set "
        "TF_ENABLE_ONEDNN_OPTS; set it in the environment instead"
    )


@pytest.mark.parametrize(
    "flag,name",
    [
        ("--inner_lr=-1", "inner_lr"),
        ("--outer_lr=0", "outer_lr"),
        ("--meta_batch_size=0", "meta_batch_size"),
        ("--inner_steps=0", "inner_steps"),
        ("--eval_inner_steps=-1", "eval_inner_steps"),
        ("--dataset=imagenet", "dataset"),
        ("--mode=serve", "mode"),
    ],
)
def test_bad_flags_get_one_line_naming_the_flag(flag, name):
    result = run_main(flag)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert name in result.stderr


def test_eval_of_a_missing_run_names_the_directory(tmp_path):
    result = run_main("--mode=eval", f"--model_dir={tmp_path}/nothing")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"--model_dir={tmp_path}/nothing" in result.stderr


def test_flagfile_is_read(tmp_path):
    flagfile = tmp_path / "run.flags"
    flagfile.write_text("--k_shot=5\n--inner_lr=-0.5\n")
    result = run_main(f"--flagfile={flagfile}")
    assert result.returncode != 0
    assert "inner_lr" in result.stderr and "Traceback" not in result.stderr


def test_helpfull_lists_every_flag_with_its_symbol():
    # absl prints the help and exits with status 1.
    result = run_main("--helpfull")
    for text in ("--inner_lr", "α", "--outer_lr", "β", "--meta_batch_size", "--eval_inner_steps"):
        assert text in result.stdout


def test_deterministic_runs_with_one_seed_agree_bit_for_bit(tmp_path):
    outputs = []
    for name in ("a", "b"):
        model_dir = tmp_path / name
        result = run_main(
            "--deterministic",
            "--nobaseline",
            "--seed=3",
            "--train_steps=20",
            "--steps_per_epoch=10",
            "--val_tasks=5",
            "--test_tasks=10",
            "--eval_inner_steps=2",
            "--verbose=0",
            f"--model_dir={model_dir}",
        )
        assert result.returncode == 0, stderr_tail(result)
        results = json.loads((model_dir / "results.json").read_text())
        assert results["config"]["seed"] == 3 and results["config"]["deterministic"]
        weights = (model_dir / "learner.weights.h5").read_bytes()
        outputs.append((results["test"], weights))
    assert outputs[0][0] == outputs[1][0]
    assert outputs[0][1] == outputs[1][1]


def test_thread_pools_sized_after_tensorflow_started_are_one_clear_error():
    script = (
        "import tensorflow as tf\n"
        "from maml_tf import training\n"
        "from maml_tf.errors import UserError\n"
        "tf.constant(1.0) + 1.0\n"
        "training.set_threads(0, 0)\n"  # nothing asked: nothing to refuse
        "try:\n"
        "    training.set_threads(3, 0)\n"
        "except UserError as error:\n"
        "    print(error)\n"
    )
    result = run_script(script)
    assert result.returncode == 0, stderr_tail(result)
    assert result.stdout.startswith("--inter_op_threads=3: TensorFlow already runs")
