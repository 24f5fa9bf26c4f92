"""`--resample` reaches the Omniglot episodes, and a saved run keeps the filter it trained with."""

import json

import numpy as np
import pytest
from absl import flags as absl_flags
from omniglot_fixture import write_omniglot

import flags
from maml_tf.config import Config
from maml_tf.data import datasets


@pytest.fixture(scope="module")
def omniglot_to_resize(tmp_path_factory):
    """The official counts at 56x56, so that loading really resizes (to 28x28)."""
    data_dir = tmp_path_factory.mktemp("omniglot56")
    write_omniglot(data_dir, characters_per_part=(964, 659), image_side=56)
    return data_dir


def first_validation_images(data_dir, resample):
    config = Config(
        dataset="omniglot", data_dir=str(data_dir), resample=resample, val_tasks=4, test_tasks=4
    ).resolve()
    built = datasets.build_datasets(config)
    episode = next(iter(built.val))
    return np.concatenate(
        [episode["support_x"].numpy().ravel(), episode["query_x"].numpy().ravel()]
    )


def test_nearest_gives_binary_episodes_and_lanczos_grey_levels(omniglot_to_resize):
    binary = first_validation_images(omniglot_to_resize, "nearest")
    grey = first_validation_images(omniglot_to_resize, "lanczos")
    assert set(np.unique(binary)) == {0.0, 1.0}
    assert len(np.unique(grey)) > 2


def test_the_flag_sets_the_config():
    flag_values = absl_flags.FlagValues()
    flags.define_flags(flag_values)
    flag_values(["main.py", "--dataset=omniglot", "--resample=nearest"])
    assert flags.to_config(flag_values).resample == "nearest"


def test_an_unknown_filter_is_refused_by_the_flag():
    flag_values = absl_flags.FlagValues()
    flags.define_flags(flag_values)
    with pytest.raises(absl_flags.IllegalFlagValueError, match="resample"):
        flag_values(["main.py", "--resample=bicubic"])


def test_a_saved_config_keeps_its_filter(tmp_path):
    path = tmp_path / "config.json"
    Config(dataset="omniglot", resample="nearest").save(path)
    assert Config.load(path).resample == "nearest"


def test_a_config_saved_before_the_flag_existed_loads_as_lanczos(tmp_path):
    # Models shipped before --resample (pretrained/omniglot_5w1s) were trained on LANCZOS images.
    values = json.loads(Config(dataset="omniglot").to_json())
    del values["resample"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))
    assert Config.load(path).resample == "lanczos"
