"""End-to-end `main.py` runs on Omniglot-layout zips with the official counts."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from cli import run_main, run_module, stderr_tail

from maml_tf import checkpoints, plots, pretrained

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
    assert result.returncode == 0, stderr_tail(result)
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
    assert result.returncode == 0, stderr_tail(result)
    saved = json.loads((model_dir / "eval_results.json").read_text())
    assert len(saved["test"]["query_accuracy_mean"]) == 3
    assert len(saved["test"]["query_accuracy_ci95"]) == 3
    protocol = saved["protocol"]
    assert protocol["split"] == "maml"
    assert protocol["rotation"] == "episode"
    assert protocol["classes"] == {"train": 1100, "val": 100, "test": 423}
    assert (protocol["n_way"], protocol["k_shot"], protocol["n_query"]) == (5, 1, 1)
    assert protocol["test_tasks"] == 8 and protocol["eval_seed"] == 1
    assert "batch statistics" in protocol["normalisation"]


def test_eval_keeps_the_runs_rotation_unless_the_flag_sets_another(omniglot_run, tmp_path):
    model_dir, _ = omniglot_run
    # The run as saved before --rotation existed: its config has no rotation.
    legacy = tmp_path / "legacy"
    shutil.copytree(model_dir, legacy)
    config = json.loads((legacy / "config.json").read_text())
    del config["rotation"]
    (legacy / "config.json").write_text(json.dumps(config))

    def protocol(*flags):
        result = run_main("--mode=eval", f"--model_dir={legacy}", "--test_tasks=8", *flags)
        assert result.returncode == 0, stderr_tail(result)
        return json.loads((legacy / "eval_results.json").read_text())["protocol"]

    kept = protocol()
    assert (kept["rotation"], kept["classes"]["test"]) == ("classes", 1692)
    overridden = protocol("--rotation=episode")
    assert (overridden["rotation"], overridden["classes"]["test"]) == ("episode", 423)


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


def test_the_validation_curve_is_read_from_the_training_logs(omniglot_run):
    model_dir, _ = omniglot_run
    iterations, accuracy = plots.read_validation_curve(model_dir)
    # --train_steps=4 in epochs of --steps_per_epoch=2: validated after meta-updates 2 and 4.
    np.testing.assert_array_equal(iterations, [2, 4])
    assert np.all((accuracy >= 0) & (accuracy <= 1))


def test_training_writes_a_saved_model(omniglot_run):
    model_dir, result = omniglot_run
    assert f"SavedModel: {model_dir}/export" in result.stdout
    assert (model_dir / "export" / "saved_model.pb").exists()


def test_export_mode_writes_a_saved_model_that_adapts_to_a_5_way_1_shot_task(
    omniglot_run, tmp_path
):
    model_dir, _ = omniglot_run
    export_dir = tmp_path / "exported"
    result = run_main("--mode=export", f"--model_dir={model_dir}", f"--export_dir={export_dir}")
    assert result.returncode == 0, stderr_tail(result)
    assert str(export_dir) in result.stdout
    # Loaded where only TensorFlow is imported, as a server would.
    script = (
        "import numpy as np, sys, tensorflow as tf\n"
        "f = tf.saved_model.load(sys.argv[1]).signatures['adapt_and_predict']\n"
        "x = np.random.default_rng(0).random((5, 28, 28, 1), dtype=np.float32)\n"
        "out = f(support_x=x, support_y=np.arange(5, dtype=np.int32), query_x=x)\n"
        "print(out['probabilities'].shape, out['labels'].numpy().tolist())\n"
        "assert 'maml_tf' not in sys.modules\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-I", "-c", script, str(export_dir)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert loaded.returncode == 0, stderr_tail(loaded)
    shape, labels = loaded.stdout.strip().split(") ")
    assert shape == "(5, 5" and len(json.loads(labels)) == 5


def test_export_into_an_existing_directory_is_refused_without_overwrite(omniglot_run, tmp_path):
    model_dir, _ = omniglot_run
    (tmp_path / "taken").mkdir()
    refused = run_main(
        "--mode=export", f"--model_dir={model_dir}", f"--export_dir={tmp_path}/taken"
    )
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert f"--export_dir={tmp_path}/taken already exists" in refused.stderr
    replaced = run_main(
        "--mode=export", f"--model_dir={model_dir}", f"--export_dir={tmp_path}/taken", "--overwrite"
    )
    assert replaced.returncode == 0, stderr_tail(replaced)
    assert (tmp_path / "taken" / "saved_model.pb").exists()


def test_a_packaged_model_meta_tests_exactly_as_its_run(omniglot_run, full_size_omniglot, tmp_path):
    model_dir, _ = omniglot_run
    packaged = tmp_path / "pretrained" / "tiny"
    made = run_module("maml_tf.pretrained", model_dir, packaged)
    assert made.returncode == 0, stderr_tail(made)
    assert sorted(p.name for p in packaged.iterdir()) == [
        "config.json",
        "learner.weights.h5",
        "results.json",
    ]
    shipped = json.loads((packaged / "config.json").read_text())
    assert shipped["data_dir"] is None and shipped["n_way"] == 5
    for name in ("config.json", "results.json"):  # no paths of the training machine
        text = (packaged / name).read_text()
        assert str(model_dir) not in text and str(full_size_omniglot) not in text, name

    def eval_accuracy(*args):
        out = tmp_path / f"eval{len(list(tmp_path.iterdir()))}"
        result = run_main(
            "--mode=eval",
            *args,
            f"--data_dir={full_size_omniglot}",
            "--test_tasks=8",
            f"--model_dir={out}",
        )
        assert result.returncode == 0, stderr_tail(result)
        return json.loads((out / "eval_results.json").read_text())["test"]

    from_run = eval_accuracy(f"--init_from={model_dir}")
    from_package = eval_accuracy(f"--init_from={packaged}")
    assert from_package["query_accuracy_mean"] == from_run["query_accuracy_mean"]
    assert from_package["query_loss_mean"] == from_run["query_loss_mean"]


def test_validate_gives_a_packaged_models_selection_accuracy(
    omniglot_run, full_size_omniglot, tmp_path
):
    # A package holds the best θ as learner.weights.h5 and no checkpoints; the run's own
    # best.weights.h5 path is checked on the sinusoid run in test_main.py.
    model_dir, _ = omniglot_run
    (best,) = checkpoints.read_saves(model_dir / checkpoints.CHECKPOINT_DIR / "maml" / "best")
    packaged = tmp_path / "tiny"
    pretrained.package(str(model_dir), str(packaged))
    out = tmp_path / "validated"
    result = run_main(
        "--mode=validate",
        f"--init_from={packaged}",
        f"--data_dir={full_size_omniglot}",
        f"--model_dir={out}",
    )
    assert result.returncode == 0, stderr_tail(result)
    validated = json.loads((out / "val_results.json").read_text())["test"]
    assert validated["num_tasks"] == 4 and len(validated["query_accuracy_mean"]) == 3
    assert validated["query_accuracy_mean"][-1] == pytest.approx(best.best_score, abs=1e-6)


def test_a_packaged_model_loads_and_adapts_in_one_call(omniglot_run, tmp_path):
    model_dir, _ = omniglot_run
    pretrained.package(str(model_dir), str(tmp_path / "tiny"))
    model = pretrained.load(str(tmp_path / "tiny"))
    reference = pretrained.load(str(model_dir))
    x = np.random.default_rng(0).random((5, 28, 28, 1), dtype=np.float32)
    y = np.arange(5, dtype=np.int32)
    assert model.eval_inner_steps == 2 and model.inner_lr == reference.inner_lr
    adapted = model.forward(model.adapt(x, y), x).numpy()
    np.testing.assert_array_equal(adapted, reference.forward(reference.adapt(x, y), x).numpy())
    # Adapting changed the predictions: the steps ran.
    assert np.abs(adapted - model.forward(model.theta(), x).numpy()).max() > 1e-4


def test_packaging_a_directory_without_a_run_ends_in_one_error_line(tmp_path):
    made = run_module("maml_tf.pretrained", tmp_path / "none", tmp_path / "o")
    assert made.returncode == 1 and "Traceback" not in made.stderr
    assert made.stderr.strip().splitlines()[
        -1
    ] == f"error: {tmp_path / 'none'}: no trained run or model here " + (
        f"({tmp_path / 'none' / 'config.json'} is missing)"
    )
    assert not (tmp_path / "o").exists()
