"""A flag that the chosen data set, learner or mode does not read is refused in one line, not
ignored."""

import json

import pytest
from absl import flags as absl_flags

import flags
from maml_tf import training
from maml_tf.config import Config
from maml_tf.errors import UserError
from tests.cli import run_main


def parsed(*argv):
    flag_values = absl_flags.FlagValues()
    flags.define_flags(flag_values)
    flag_values(["main.py", *argv])
    return flags.to_config(flag_values)


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["--dataset=folder", "--split=lake"],
            "--split=lake: only --dataset=omniglot reads it; this run's --dataset is folder",
        ),
        (
            ["--dataset=sinusoid", "--rotation=episode"],
            "--rotation=episode: only --dataset=omniglot reads it; this run's --dataset is "
            "sinusoid",
        ),
        (
            ["--dataset=folder", "--resample=nearest"],
            "--resample=nearest: only --dataset=omniglot reads it; this run's --dataset is folder",
        ),
        (
            ["--dataset=folder", "--cache_dir=/tmp/c"],
            "--cache_dir=/tmp/c: only --dataset=omniglot reads it; this run's --dataset is folder",
        ),
        (
            ["--dataset=sinusoid", "--data_dir=/tmp/d"],
            "--data_dir=/tmp/d: only --dataset=omniglot and --dataset=folder read it; this "
            "run's --dataset is sinusoid",
        ),
        (
            ["--dataset=sinusoid", "--n_way=5"],
            "--n_way=5: only --dataset=omniglot and --dataset=folder read it; this run's "
            "--dataset is sinusoid",
        ),
        (
            ["--dataset=sinusoid", "--image_size=28"],
            "--image_size=28: only --dataset=omniglot and --dataset=folder read it; this run's "
            "--dataset is sinusoid",
        ),
        (
            ["--dataset=omniglot", "--cache_dir=/tmp/c"],
            "--cache_dir=/tmp/c: only Omniglot read from --data_dir is cached (without "
            "--data_dir TFDS loads it, with its own cache)",
        ),
        (
            ["--dataset=omniglot", "--split=lake", "--rotation=classes"],
            "--rotation=classes: --split=lake has no rotations (only --split=maml)",
        ),
        (
            ["--dataset=omniglot", "--split=lake", "--rotation=episode"],
            "--rotation=episode: --split=lake has no rotations (only --split=maml)",
        ),
        (
            ["--dataset=omniglot", "--baseline"],
            "--baseline: only --dataset=sinusoid reads it; this run's --dataset is omniglot",
        ),
        (
            ["--dataset=folder", "--nobaseline"],
            "--nobaseline: only --dataset=sinusoid reads it; this run's --dataset is folder",
        ),
        (
            ["--dataset=sinusoid", "--learner=conv4"],
            "--learner=conv4: --dataset=sinusoid's inputs are scalars, which --learner=mlp takes",
        ),
        (
            ["--dataset=omniglot", "--learner=mlp"],
            "--learner=mlp: --dataset=omniglot's inputs are images, which --learner=conv4 takes",
        ),
        (
            ["--dataset=sinusoid", "--conv_variant=maxpool"],
            "--conv_variant=maxpool: only --learner=conv4 reads it; this run's is mlp",
        ),
        (
            ["--dataset=sinusoid", "--filters=32"],
            "--filters=32: only --learner=conv4 reads it; this run's is mlp",
        ),
        (
            ["--dataset=sinusoid", "--paper_network"],
            "--paper_network: only --learner=conv4 reads it; this run's is mlp",
        ),
    ],
)
def test_a_flag_the_run_would_ignore_is_refused(argv, message):
    config = parsed(*argv)
    with pytest.raises(UserError) as error:
        config.resolve()
    assert str(error.value) == message


@pytest.mark.parametrize(
    "argv",
    [
        ["--dataset=sinusoid"],
        ["--dataset=sinusoid", "--learner=mlp", "--nobaseline"],
        ["--dataset=omniglot"],
        [
            "--dataset=omniglot",
            "--data_dir=/tmp/d",
            "--cache_dir=/tmp/c",
            "--split=lake",
            "--rotation=none",
            "--resample=nearest",
            "--n_way=20",
            "--image_size=32",
            "--learner=conv4",
            "--conv_variant=maxpool",
            "--filters=32",
            "--paper_network",
        ],
        ["--dataset=omniglot", "--rotation=classes"],
        ["--dataset=omniglot", "--rotation=none"],
        ["--dataset=omniglot", "--split=lake"],
        ["--dataset=folder", "--data_dir=/tmp/d", "--n_way=5", "--image_size=84"],
    ],
)
def test_flags_the_run_reads_are_accepted(argv):
    resolved = parsed(*argv).resolve()
    # What a run saves must resolve again: eval and continuing a run load it.
    assert Config(**json.loads(resolved.to_json())).resolve() == resolved


def test_eval_refuses_an_override_the_saved_model_would_ignore(tmp_path):
    run = tmp_path / "sinusoid"
    run.mkdir()
    Config(dataset="sinusoid", model_dir=str(run)).resolve().save(run / "config.json")
    with pytest.raises(UserError, match="^--rotation=episode: only --dataset=omniglot reads it"):
        training.evaluate(
            Config(init_from=str(run), model_dir=str(tmp_path / "eval"), rotation="episode")
        )


@pytest.mark.parametrize("saved", ["absent", "episode"])
def test_a_lake_split_config_saved_before_none_existed_loads_as_none(tmp_path, saved):
    # The lake split never rotated. Configs saved before the field existed lack it, and those
    # saved before "none" existed recorded "episode"; both must load as what they trained on,
    # not as "classes" (the legacy maml rule) or as a rotation the lake split now refuses.
    values = json.loads(Config(dataset="omniglot", split="lake").resolve().to_json())
    assert values["rotation"] == "none"
    if saved == "absent":
        del values["rotation"]
    else:
        values["rotation"] = saved
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))
    assert Config.load(path).resolve().rotation == "none"


def test_the_command_line_prints_one_line_and_no_traceback(tmp_path):
    result = run_main("--dataset=sinusoid", "--learner=conv4", f"--model_dir={tmp_path / 'run'}")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --learner=conv4: --dataset=sinusoid's inputs are scalars, which --learner=mlp takes"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["--tuner=bayesian"],
            "flag --tuner=bayesian: only --mode=tune reads it; this is --mode=train",
        ),
        (
            ["--mode=eval", "--max_trials=5"],
            "flag --max_trials=5: only --mode=tune reads it; this is --mode=eval",
        ),
        (
            ["--inner_lr_range=0.01,0.1", "--mode=export"],
            "flag --inner_lr_range=['0.01', '0.1']: only --mode=tune reads it; this is "
            "--mode=export",
        ),
        (
            ["--export_dir=/tmp/e"],
            "flag --export_dir=/tmp/e: only --mode=export reads it; this is --mode=train",
        ),
        (
            ["--mode=tune", "--overwrite"],
            "flag --overwrite=True: only --mode=export reads it; this is --mode=tune",
        ),
        (
            ["--test_tasks=5", "--mode=validate"],
            "flag --test_tasks=5: --mode=validate does not read it: it uses the run's own "
            "validation tasks (its val_tasks)",
        ),
        (
            ["--mode=tune", "--test_tasks=5"],
            "flag --test_tasks=5: --mode=tune does not read it: a search meta-tests nothing (it "
            "validates its trials on --val_tasks); give it to the run trained from the search's "
            "best.flags",
        ),
        (
            ["--mode=export", "--test_tasks=5"],
            "flag --test_tasks=5: --mode=export does not read it: an export meta-tests nothing",
        ),
    ],
)
def test_a_flag_of_another_mode_is_refused(argv, message):
    with pytest.raises(absl_flags.IllegalFlagValueError) as error:
        parsed(*argv)
    assert str(error.value) == message


@pytest.mark.parametrize(
    "argv",
    [
        # The mode may come after the flag, as in a flagfile followed by --mode.
        ["--tuner=bayesian", "--inner_lr_range=0.01,0.1", "--tune_first_order", "--mode=tune"],
        ["--mode=export", "--export_dir=/tmp/e", "--overwrite"],
        ["--mode=eval"],
        ["--mode=eval", "--test_tasks=5"],
        ["--mode=validate", "--val_tasks=5"],
    ],
)
def test_a_flag_of_its_own_mode_is_accepted(argv):
    parsed(*argv)


def test_the_flag_error_is_one_line_before_tensorflow_loads(tmp_path):
    result = run_main("--tuner=hyperband", f"--model_dir={tmp_path / 'run'}")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "tensorflow" not in result.stderr.lower()
    assert (
        "FATAL Flags parsing error: flag --tuner=hyperband: only --mode=tune reads it; this is "
        "--mode=train"
    ) in result.stderr.splitlines()
    assert not (tmp_path / "run").exists()


def test_a_config_saved_when_every_data_set_had_baseline_true_still_loads(tmp_path):
    # Before --baseline applied to sinusoid alone, every run saved "baseline": true; an
    # Omniglot run or shipped model saved then must still meta-test and continue.
    values = json.loads(Config(dataset="omniglot").resolve().to_json())
    assert values["baseline"] is None
    values["baseline"] = True
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))
    loaded = Config.load(path)
    assert loaded.baseline is None
    assert loaded.resolve() == Config(dataset="omniglot").resolve()
    assert Config(dataset="sinusoid").resolve().baseline is True


def test_an_epoch_is_at_most_the_whole_run():
    short = Config(dataset="sinusoid", train_steps=40, steps_per_epoch=100).resolve()
    assert (short.epoch_steps, short.epochs()) == (40, 1)
    run = Config(dataset="sinusoid", train_steps=300, steps_per_epoch=100).resolve()
    assert (run.epoch_steps, run.epochs()) == (100, 3)
