"""The MAML wrapper's Keras plumbing: fit, evaluate, predict, adapt, metrics and config."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from maml_tf import MAML, learners
from maml_tf.data import sinusoid


@pytest.fixture
def model():
    keras.utils.set_random_seed(0)
    model = MAML(learners.mlp(hidden=(16, 16)), inner_lr=0.01, inner_steps=1, eval_inner_steps=3)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    return model


def tasks(batch=4, num_tasks=None, seed=0, split="train"):
    return sinusoid.task_dataset(5, 5, batch, seed, split=split, num_tasks=num_tasks)


def test_fit_reports_the_documented_metrics(model):
    history = model.fit(tasks(), steps_per_epoch=3, epochs=1, shuffle=False, verbose=0)
    assert set(history.history) == {"query_loss", "support_loss"}


def test_evaluate_reports_query_loss_after_every_inner_step(model):
    logs = model.evaluate(tasks(num_tasks=8, split="val"), return_dict=True, verbose=0)
    assert {f"query_loss_step_{i}" for i in range(4)} <= set(logs)
    assert logs["query_loss"] == pytest.approx(logs["query_loss_step_3"])


def test_classification_reports_accuracy_per_step():
    learner = learners.conv4(3, image_shape=(8, 8, 1), filters=4, blocks=2)
    model = MAML(learner, 0.5, eval_inner_steps=2, loss="sparse_categorical_crossentropy")
    model.compile()
    episodes = {
        "support_x": tf.random.normal((2, 6, 8, 8, 1)),
        "support_y": tf.constant([[0, 1, 2, 0, 1, 2]] * 2),
        "query_x": tf.random.normal((2, 3, 8, 8, 1)),
        "query_y": tf.constant([[0, 1, 2]] * 2),
    }
    logs = model.evaluate(tf.data.Dataset.from_tensors(episodes), return_dict=True, verbose=0)
    for i in range(3):
        assert 0.0 <= logs[f"query_accuracy_step_{i}"] <= 1.0
    assert (
        "query_accuracy"
        in model.fit(
            tf.data.Dataset.from_tensors(episodes), epochs=1, shuffle=False, verbose=0
        ).history
    )


def test_adapt_lowers_the_support_loss_and_leaves_theta_alone(model):
    task = next(iter(tasks(batch=1)))
    x, y = task["support_x"][0], task["support_y"][0]
    theta = [v.numpy().copy() for v in model.learner.trainable_variables]
    before = float(tf.reduce_mean((model.forward(model.theta(), x) - y) ** 2))
    fast = model.adapt(x, y, steps=5)
    after = float(tf.reduce_mean((model.forward(fast, x) - y) ** 2))
    assert after < before
    for variable, value in zip(model.learner.trainable_variables, theta, strict=True):
        np.testing.assert_array_equal(variable.numpy(), value)


def test_adapt_with_zero_steps_returns_theta(model):
    task = next(iter(tasks(batch=1)))
    weights = model.adapt(task["support_x"][0], task["support_y"][0], steps=0)
    for w, v in zip(weights, model.learner.trainable_variables, strict=True):
        np.testing.assert_array_equal(w.numpy(), v.numpy())


def test_predict_adapts_then_predicts_the_query_set(model):
    batch = next(iter(tasks(batch=3)))
    predictions = model.predict(tf.data.Dataset.from_tensors(batch), verbose=0)
    assert predictions.shape == (3, 5, 1)
    weights = model.adapt(batch["support_x"][1], batch["support_y"][1])
    np.testing.assert_allclose(
        predictions[1], model.forward(weights, batch["query_x"][1]).numpy(), rtol=1e-5, atol=1e-6
    )


def test_training_reduces_the_meta_loss(model):
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    val = tasks(batch=25, num_tasks=50, split="val")
    before = model.evaluate(val, return_dict=True, verbose=0)["query_loss"]
    model.fit(tasks(batch=10), steps_per_epoch=300, epochs=1, shuffle=False, verbose=0)
    after = model.evaluate(val, return_dict=True, verbose=0)["query_loss"]
    assert after < 0.8 * before


def test_config_round_trip(model):
    clone = MAML.from_config(model.get_config())
    assert clone.inner_lr == model.inner_lr and clone.eval_inner_steps == 3
    assert [v.shape for v in clone.learner.trainable_variables] == [
        v.shape for v in model.learner.trainable_variables
    ]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"inner_lr": 0.0}, "inner_lr"),
        ({"inner_lr": 0.1, "inner_steps": -1}, "inner_steps"),
        ({"inner_lr": 0.1, "eval_inner_steps": -1}, "eval_inner_steps"),
        ({"inner_lr": 0.1, "loss": "hinge"}, "loss"),
        ({"inner_lr": 0.1, "task_loop": "vmap"}, "task_loop"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MAML(learners.mlp(), **kwargs)
