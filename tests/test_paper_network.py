"""`--paper_network` and `MAML(outer_only=...)`: the paper code's conv4, wired through the run.

The meta-gradients with `outer_only` are checked against finite differences in
`test_maml_gradients.py`; these tests check the network, the inner loop and the plumbing.
"""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags as absl_flags

import flags
from maml_tf import MAML, learners, pretrained, training
from maml_tf.config import Config


def small_conv4(paper_network):
    keras.utils.set_random_seed(0)
    return learners.conv4(
        5, image_shape=(28, 28, 1), filters=64, blocks=4, paper_network=paper_network
    )


def variable_names(learner):
    return [v.path.split("/", 1)[1] for v in learner.trainable_variables]


def test_the_paper_network_has_no_scale_and_a_unit_normal_head():
    paper, default = small_conv4(True), small_conv4(False)
    assert not any(name.endswith("gamma") for name in variable_names(paper))
    assert sum(name.endswith("gamma") for name in variable_names(default)) == 4
    # 4 gammas of 64 fewer weights, the same shapes otherwise.
    assert default.count_params() - paper.count_params() == 4 * 64
    head = paper.get_layer("logits").kernel.numpy()
    # 320 draws of N(0, 1): a std of 1 within sampling error; Glorot-uniform's is 0.17.
    assert 0.85 < head.std() < 1.15
    assert default.get_layer("logits").kernel.numpy().std() < 0.25


def test_normalization_offsets_are_the_betas():
    learner = small_conv4(True)
    offsets = learners.normalization_offsets(learner)
    assert [v.path.split("/", 1)[1] for v in offsets] == [f"norm{i}/beta" for i in range(4)]


def episode(seed=0):
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.normal(size=(10, 28, 28, 1)), tf.float32)
    return x, tf.constant(np.arange(10) % 5, tf.int32)


def test_adapt_leaves_outer_only_weights_at_theta_and_moves_the_others():
    learner = small_conv4(True)
    model = MAML(
        learner,
        0.4,
        loss="sparse_categorical_crossentropy",
        outer_only=learners.normalization_offsets(learner),
    )
    x, y = episode()
    fast = model.adapt(x, y, steps=2)
    for variable, weight in zip(learner.trainable_variables, fast, strict=True):
        moved = not np.array_equal(variable.numpy(), weight.numpy())
        assert moved == (not variable.path.endswith("beta")), variable.path


def test_outer_only_accepts_paths_positions_or_a_predicate_and_survives_get_config():
    learner = small_conv4(True)
    offsets = learners.normalization_offsets(learner)
    positions = tuple(
        i for i, v in enumerate(learner.trainable_variables) if v.path.endswith("beta")
    )
    assert len(positions) == 4
    by_path = MAML(learner, 0.4, outer_only=[v.path for v in offsets])
    by_predicate = MAML(learner, 0.4, outer_only=lambda v: v.path.endswith("beta"))
    by_position = MAML(learner, 0.4, outer_only=positions)
    by_numpy_position = MAML(
        learner,
        0.4,
        outer_only=np.flatnonzero([v.path.endswith("beta") for v in learner.trainable_variables]),
    )
    assert by_path.outer_only == by_predicate.outer_only == by_position.outer_only == positions
    assert by_numpy_position.outer_only == positions
    config = by_path.get_config()
    json.dumps(config)  # saved with the model: plain strings only
    assert MAML.from_config(config).outer_only == by_path.outer_only


def test_outer_only_refuses_a_foreign_variable_and_an_empty_inner_loop():
    learner = small_conv4(True)
    stranger = keras.Variable(np.zeros(3), name="stranger")
    with pytest.raises(ValueError, match="not a trainable variable"):
        MAML(learner, 0.4, outer_only=[stranger])
    with pytest.raises(ValueError, match="out of range"):
        MAML(learner, 0.4, outer_only=[len(learner.trainable_variables)])
    with pytest.raises(ValueError, match="nothing left to adapt"):
        MAML(learner, 0.4, outer_only=learner.trainable_variables)


def parse(*argv):
    flag_values = absl_flags.FlagValues()
    flags.define_flags(flag_values)
    flag_values(["main.py", *argv])
    return flags.to_config(flag_values)


@pytest.mark.parametrize("paper_network", [False, True])
def test_the_flag_builds_the_network_and_keeps_its_offsets_out_of_the_inner_loop(paper_network):
    argv = ["--dataset=omniglot", "--n_way=5"] + (["--paper_network"] if paper_network else [])
    config = parse(*argv).resolve()
    assert config.paper_network == paper_network
    learner = training.build_learner(config)
    model = training.build_model(config, learner)
    expected = learners.normalization_offsets(learner) if paper_network else []
    outer = [learner.trainable_variables[i] for i in model.outer_only]
    assert [v.path for v in outer] == [v.path for v in expected]
    has_gamma = any(v.path.endswith("gamma") for v in learner.trainable_variables)
    assert has_gamma == (not paper_network)


def test_a_config_saved_before_the_flag_existed_loads_as_the_default_network(tmp_path):
    # The shipped 5-way 1-shot models were trained with gamma and adapted offsets.
    values = json.loads(Config(dataset="omniglot").to_json())
    del values["paper_network"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))
    assert Config.load(path).paper_network is False


def test_a_packaged_paper_network_loads_with_its_offsets_outer_only(tmp_path):
    config = Config(dataset="omniglot", n_way=5, paper_network=True, model_dir=str(tmp_path))
    config = config.resolve()
    model = training.build_model(config, training.build_learner(config))
    run = tmp_path / "run"
    run.mkdir()
    config.save(run / "config.json")
    model.learner.save_weights(run / training.BEST_WEIGHTS)
    target = tmp_path / "shipped"
    pretrained.package(str(run), str(target))
    loaded = pretrained.load(str(target))
    assert loaded.outer_only == model.outer_only != ()
    for a, b in zip(
        loaded.learner.trainable_variables, model.learner.trainable_variables, strict=True
    ):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
