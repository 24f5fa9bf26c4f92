"""`--rotation` reaches the Omniglot episodes; new runs turn per episode, saved runs keep theirs."""

import json

import pytest
from absl import flags as absl_flags

import flags
from maml_tf.config import Config
from maml_tf.data import datasets


def parsed(*argv):
    flag_values = absl_flags.FlagValues()
    flags.define_flags(flag_values)
    flag_values(["main.py", *argv])
    return flags.to_config(flag_values)


def test_a_new_omniglot_run_rotates_per_episode_as_the_papers_code():
    assert parsed("--dataset=omniglot").resolve().rotation == "episode"


def test_the_flag_sets_the_config():
    assert parsed("--dataset=omniglot", "--rotation=classes").resolve().rotation == "classes"


def test_an_unknown_rotation_is_refused_by_the_flag():
    with pytest.raises(absl_flags.IllegalFlagValueError, match="rotation"):
        parsed("--rotation=sometimes")


def test_a_saved_config_keeps_its_rotation(tmp_path):
    path = tmp_path / "config.json"
    Config(dataset="omniglot", rotation="episode").resolve().save(path)
    assert Config.load(path).rotation == "episode"


def test_an_omniglot_config_saved_before_the_flag_existed_loads_as_classes(tmp_path):
    # The models shipped before --rotation were trained with rotated characters as classes.
    values = json.loads(Config(dataset="omniglot").resolve().to_json())
    del values["rotation"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))
    assert Config.load(path).resolve().rotation == "classes"


def test_other_data_sets_have_no_rotation(tmp_path):
    values = json.loads(Config(dataset="sinusoid").resolve().to_json())
    del values["rotation"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))
    assert Config.load(path).resolve().rotation is None


@pytest.mark.parametrize(
    "rotation,classes",
    [
        ("episode", {"train": 1100, "val": 100, "test": 423}),
        ("classes", {"train": 4400, "val": 400, "test": 1692}),
    ],
)
def test_the_protocol_names_the_rotation_and_its_classes(full_size_omniglot, rotation, classes):
    config = Config(
        dataset="omniglot",
        data_dir=str(full_size_omniglot),
        rotation=rotation,
        val_tasks=4,
        test_tasks=4,
    ).resolve()
    protocol = datasets.build_datasets(config).protocol
    assert protocol["rotation"] == rotation
    assert protocol["classes"] == classes
    expected = [0, 90, 180, 270] if rotation == "episode" else [0]
    assert protocol["episode_rotations"] == expected
