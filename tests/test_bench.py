"""Tests of maml_tf.bench: the analytic FLOP counts, the data it times on, and one tiny run."""

import dataclasses
import json

import keras
import numpy as np
import pytest
from cli import run_module, run_script, stderr_tail

from maml_tf import bench, learners, maml, training
from maml_tf.config import Config

NUMBER_FIELDS = (
    "first_call_s",
    "step_ms_median",
    "step_ms_p10",
    "step_ms_p25",
    "step_ms_p75",
    "step_ms_p90",
    "step_ms_min",
    "step_ms_max",
    "peak_rss_mib",
    "rss_after_warmup_mib",
    "rss_after_steps_mib",
    "peak_rss_before_model_mib",
    "flops_per_step",
    "forward_flops_per_example",
    "matmul_gflops",
    "achieved_gflops",
    "fraction_of_matmul_peak",
    "cpu_count",
    "traces",
)
OTHER_FIELDS = (
    "config",
    "task_loop",
    "task_loop_resolved",
    "order",
    "flops_formula",
    "peak_rss_method",
    "step_ms_all",
    "warmup_ms",
    "onednn",
    "onednn_requested",
    "inter_op_threads",
    "intra_op_threads",
    "timestamp",
    "tf_version",
    "keras_version",
)


def tiny_conv_dense_learner():
    return keras.Sequential(
        [
            keras.Input(shape=(6, 6, 2)),
            keras.layers.Conv2D(3, 3, strides=2, padding="same"),  # -> 3x3x3
            learners.TaskNormalization(),
            keras.layers.ReLU(),
            keras.layers.Conv2D(4, 2, padding="valid"),  # -> 2x2x4
            keras.layers.Flatten(),  # -> 16
            keras.layers.Dense(5),
        ]
    )


def test_forward_flops_of_a_tiny_conv_dense_learner_match_a_hand_count():
    # conv0: 3*3 positions x 3 filters x (3*3 kernel x 2 channels) = 486 MACs;
    # conv1: 2*2 positions x 4 filters x (2*2 x 3) = 192; dense: 16 x 5 = 80. 2 FLOPs per MAC.
    per_example = 2 * (486 + 192 + 80)
    learner = tiny_conv_dense_learner()
    assert bench.forward_flops(learner, 1) == per_example
    assert bench.forward_flops(learner, 7) == 7 * per_example


def test_forward_flops_of_the_sinusoid_mlp_match_a_hand_count():
    assert bench.forward_flops(learners.mlp(), 10) == 10 * 2 * (1 * 40 + 40 * 40 + 40 * 1)


def test_forward_flops_of_the_strided_conv4_match_a_hand_count():
    # 28 -> 14 -> 7 -> 4 -> 2 with stride 2 and "same" padding; then 64 -> 5 logits.
    macs = 14 * 14 * 64 * 9 * 1 + (7 * 7 + 4 * 4 + 2 * 2) * 64 * 9 * 64 + 64 * 5
    assert bench.forward_flops(learners.conv4(5), 1) == 2 * macs


def test_forward_flops_refuses_layers_it_cannot_count():
    learner = keras.Sequential(
        [keras.Input(shape=(4, 4, 1)), keras.layers.Conv2DTranspose(2, 3), keras.layers.Flatten()]
    )
    with pytest.raises(ValueError, match="cannot count"):
        bench.forward_flops(learner)


def test_meta_step_flops_follow_the_documented_formula():
    config = bench.config_by_name("sinusoid")  # B=25, k=1, s=q=10
    forward = bench.forward_flops(learners.mlp(), 10)
    flops, formula = bench.meta_step_flops(config, learners.mlp())
    assert flops == 25 * (9 * 1 * forward + 3 * forward)
    assert "B*(9k*F(s) + 3F(q))" in formula
    first_order = dataclasses.replace(config, first_order=True)
    flops, formula = bench.meta_step_flops(first_order, learners.mlp())
    assert flops == 25 * (3 * 1 * forward + 3 * forward)
    assert formula.startswith("first order")


def test_config_names_and_first_order_variants():
    assert bench.default_config_names() == ["P1", "P1-FO", "P2", "P3", "P4", "P5", "sinusoid"]
    assert "P1-FO" not in bench.default_config_names("none")
    assert "P3-FO" in bench.default_config_names("all")
    p2_fo = bench.config_by_name("P2-FO")
    assert p2_fo.first_order and p2_fo.inner_steps == bench.CONFIGS["P2"].inner_steps
    with pytest.raises(ValueError, match="unknown"):
        bench.config_by_name("P9")


def test_the_paper_network_configuration_builds_what_training_builds():
    config = bench.config_by_name("P4")
    trained = training.build_learner(
        Config(dataset="omniglot", n_way=5, k_shot=5, paper_network=True).resolve()
    )
    benched = bench.build_learner(config)
    assert [(v.path, v.shape) for v in benched.trainable_variables] == [
        (v.path, v.shape) for v in trained.trainable_variables
    ]
    # No scale γ, unlike the default conv4.
    default = bench.build_learner(dataclasses.replace(config, paper_network=False))
    assert len(benched.trainable_variables) < len(default.trainable_variables)


def test_a_paper_network_run_leaves_the_normalisation_offsets_to_the_outer_loop():
    config = dataclasses.replace(bench.config_by_name("P4"), meta_batch_size=2, filters=4)
    record = bench.run_config(config, "map", steps=1, warmup=0, matmul_size=64, matmul_repeats=1)
    learner = bench.build_learner(config)
    expected = maml._variable_positions(learner, learners.normalization_offsets(learner))
    assert record["paper_network"] is True
    # One trace: Adam's variables exist before it (MAML.compile), so nothing retraces.
    assert record["traces"] == 1
    assert record["outer_only"] == sorted(expected) and len(expected) == 4
    assert np.isfinite(record["last_query_loss"])


def test_default_task_loops_are_those_maml_accepts():
    assert bench.default_task_loops() == tuple(maml.TASK_LOOPS)


def test_random_episodes_have_the_real_shapes_and_class_major_labels():
    config = bench.config_by_name("P3")  # 5-way 1-shot, 15 queries per class, B=32
    episodes = bench.random_episodes(config)
    assert episodes["support_x"].shape == (32, 5, 28, 28, 1)
    assert episodes["query_x"].shape == (32, 75, 28, 28, 1)
    np.testing.assert_array_equal(episodes["support_y"][3], np.arange(5))
    np.testing.assert_array_equal(episodes["query_y"][0], np.repeat(np.arange(5), 15))
    assert episodes["query_y"].dtype == np.int32
    sinusoid = bench.random_episodes(bench.config_by_name("sinusoid"))
    assert sinusoid["support_x"].shape == sinusoid["query_y"].shape == (25, 10, 1)


def test_matmul_rate_is_positive():
    assert bench.matmul_gflops(size=64, repeats=2, warmup=1) > 0
    assert bench.matmul_gflops(size=64, repeats=2, warmup=1, products=2) > 0


def test_the_matmul_rate_fills_every_core_under_a_one_thread_intra_op_pool():
    # In its own process: thread pools can be sized only before TensorFlow starts.
    script = (
        "import os\n"
        "from maml_tf import bench, training\n"
        "assert bench.matmul_parallel_products() == 1\n"  # TensorFlow's default pools
        "training.set_threads(2, 1)\n"
        "print(bench.matmul_parallel_products(), os.cpu_count())\n"
    )
    result = run_script(script)
    assert result.returncode == 0, stderr_tail(result)
    products, cores = result.stdout.split()
    assert products == cores


# One short sinusoid configuration: a child process in seconds.
TINY_RUN = (
    "--configs=sinusoid",
    "--task_loops=map",
    "--steps=2",
    "--warmup=1",
    "--matmul_size=128",
    "--matmul_repeats=2",
)


def run_bench(*args):
    return run_module("maml_tf.bench", *args)


def test_command_line_prints_one_json_line_with_every_field(tmp_path):
    output = tmp_path / "bench.jsonl"
    result = run_bench(
        *TINY_RUN,
        f"--output={output}",
    )
    assert result.returncode == 0, stderr_tail(result)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert output.read_text().strip() == lines[0]
    for field in NUMBER_FIELDS + OTHER_FIELDS:
        assert field in record, field
    for field in NUMBER_FIELDS:
        assert record[field] > 0, field
    assert (record["config"], record["task_loop"], record["order"]) == ("sinusoid", "map", "second")
    assert len(record["step_ms_all"]) == 2
    assert list(record["rss_mib_by_step"]) == ["1", "2"]  # every step when there are < 10
    assert record["matmul_parallel_products"] == 1  # TensorFlow's default pools
    assert record["flops_per_step"] == 25 * 12 * bench.forward_flops(learners.mlp(), 10)


def test_each_onednn_setting_runs_in_its_own_process_with_those_kernels():
    result = run_bench(
        *TINY_RUN,
        "--onednn=on,off",
    )
    assert result.returncode == 0, stderr_tail(result)
    records = [json.loads(line) for line in result.stdout.strip().splitlines()]
    # TensorFlow's own report, from inside each child.
    assert [(r["onednn_requested"], r["onednn"]) for r in records] == [("on", True), ("off", False)]


def test_an_unknown_onednn_setting_is_a_usage_error():
    result = run_bench("--configs=sinusoid", "--onednn=on,maybe")
    assert result.returncode != 0 and not result.stdout
    assert "--onednn=on,maybe: 'maybe' is not one of default, on, off" in result.stderr


def test_a_failing_configuration_gives_an_error_line_and_exit_status_1():
    result = run_bench("--configs=sinusoid", "--task_loops=no_such_loop", "--steps=1")
    assert result.returncode == 1
    record = json.loads(result.stdout.strip())
    assert record["config"] == "sinusoid" and "task_loop must be one of" in record["error"]
    assert record["onednn_requested"] == "default"


def test_an_unknown_configuration_is_a_usage_error():
    result = run_bench("--configs=P9")
    assert result.returncode != 0 and not result.stdout
    assert "unknown bench configuration 'P9'" in result.stderr


def test_a_child_killed_by_a_signal_is_named_and_its_whole_stderr_logged(caplog):
    # A real process that crashes in native code the way a TensorFlow op can: faulthandler
    # prints its Python stack, then the signal ends it.
    # numpy: an extension module, so faulthandler ends with its "Extension modules:" list, which
    # stderr_tail leaves out of the tests' failure messages.
    script = "import numpy, os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
    result = run_script("import faulthandler; faulthandler.enable(); " + script)
    assert result.returncode == -11
    assert "Extension modules: numpy" in result.stderr
    tail = stderr_tail(result)
    assert "Extension modules" not in tail and "Fatal Python error: Segmentation" in tail
    with caplog.at_level("ERROR"):
        record = bench.failure_record("sinusoid", "auto", result)
    assert record == {"config": "sinusoid", "task_loop": "auto", "error": "killed by SIGSEGV"}
    logged = caplog.text
    assert "killed by SIGSEGV" in logged
    assert "Fatal Python error: Segmentation fault" in logged
    assert 'File "<string>", line 1' in logged  # faulthandler's Python stack, not cut off
