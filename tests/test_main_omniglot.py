"""End-to-end `main.py` runs on Omniglot-layout zips with the official counts."""

import json
import shutil

import pytest
from cli import run_main

SMALL = [
    "--dataset=omniglot",
    "--filters=8",
    "--meta_batch_size=4",
    "--train_steps=4",
    "--steps_per_epoch=2",
    "--val_tasks=4",
    "--test_tasks=8",
    "--eval_inner_steps=2",
]


@pytest.fixture(scope="module")
def omniglot_run(full_size_omniglot, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("run") / "omniglot"
    result = run_main(*SMALL, f"--data_dir={full_size_omniglot}", f"--model_dir={model_dir}")
    return model_dir, result


def test_training_reports_validation_accuracy(omniglot_run):
    _, result = omniglot_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert "val_query_accuracy" in result.stdout
    assert "964 characters, 19280 images" in result.stderr
    assert "659 characters, 13180 images" in result.stderr


def test_training_prints_the_accuracy_table(omniglot_run):
    _, result = omniglot_run
    assert "MAML query accuracy (%)" in result.stdout
    rows = [line.split()[0] for line in result.stdout.splitlines() if line[:4].strip().isdigit()]
    assert rows == ["0", "1", "2"]


def test_eval_mode_saves_per_step_accuracy_and_the_protocol(omniglot_run, full_size_omniglot):
    model_dir, _ = omniglot_run
    result = run_main("--mode=eval", f"--model_dir={model_dir}", "--test_tasks=8")
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((model_dir / "eval_results.json").read_text())
    assert len(saved["test"]["query_accuracy_mean"]) == 3
    assert len(saved["test"]["query_accuracy_ci95"]) == 3
    protocol = saved["protocol"]
    assert protocol["split"] == "maml"
    assert protocol["classes"] == {"train": 4400, "val": 400, "test": 1692}
    assert (protocol["n_way"], protocol["k_shot"], protocol["n_query"]) == (5, 1, 1)
    assert protocol["test_tasks"] == 8 and protocol["eval_seed"] == 1
    assert "batch statistics" in protocol["normalisation"]


def test_a_missing_zip_gets_one_line_naming_it(full_size_omniglot, tmp_path):
    data_dir = tmp_path / "partial"
    data_dir.mkdir()
    shutil.copy(full_size_omniglot / "images_background.zip", data_dir)
    result = run_main(*SMALL, f"--data_dir={data_dir}", f"--model_dir={tmp_path}/run")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "images_evaluation" in errors[0]


def test_a_truncated_zip_gets_one_line_naming_it(full_size_omniglot, tmp_path):
    data_dir = tmp_path / "truncated"
    data_dir.mkdir()
    shutil.copy(full_size_omniglot / "images_evaluation.zip", data_dir)
    whole = (full_size_omniglot / "images_background.zip").read_bytes()
    (data_dir / "images_background.zip").write_bytes(whole[: len(whole) // 2])
    result = run_main(*SMALL, f"--data_dir={data_dir}", f"--model_dir={tmp_path}/run")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "images_background.zip" in errors[0]
    assert not (tmp_path / "run").exists()
