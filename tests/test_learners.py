"""The learners and the twice-differentiable normalisation layer."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from maml_tf import MAML, learners


def test_task_normalization_normalises_with_batch_statistics():
    layer = learners.TaskNormalization(epsilon=0.0, dtype="float64")
    x = tf.constant(np.random.default_rng(0).normal(3.0, 2.0, size=(16, 5, 5, 4)))
    y = layer(x).numpy()
    np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0.0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=(0, 1, 2)), 1.0, rtol=1e-10)


def test_task_normalization_second_derivatives_match_finite_differences():
    # d/dx of a gradient through the normalisation: the quantity keras' BatchNormalization
    # gets wrong (its variance treats the mean as a constant).
    layer = learners.TaskNormalization(dtype="float64")
    x0 = np.random.default_rng(1).normal(size=(6, 3))
    weights = tf.constant(np.random.default_rng(2).normal(size=(6, 3)))

    def inner_gradient_norm(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.sin(layer(x)) * weights)
        return tf.reduce_sum(tape.gradient(loss, x) ** 2)

    x = tf.constant(x0)
    with tf.GradientTape() as tape:
        tape.watch(x)
        value = inner_gradient_norm(x)
    analytic = tape.gradient(value, x).numpy()
    numeric = np.zeros_like(x0)
    eps = 1e-6
    for index in np.ndindex(x0.shape):
        step = np.zeros_like(x0)
        step[index] = eps
        numeric[index] = (
            inner_gradient_norm(tf.constant(x0 + step))
            - inner_gradient_norm(tf.constant(x0 - step))
        ) / (2 * eps)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


def batch_norm_learner():
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Dense(1),
        ]
    )


def test_second_order_maml_refuses_keras_batch_normalization():
    with pytest.raises(
        ValueError, match="BatchNormalization.*second derivatives.*TaskNormalization"
    ):
        MAML(batch_norm_learner(), inner_lr=0.1)


def test_first_order_maml_accepts_keras_batch_normalization():
    model = MAML(batch_norm_learner(), inner_lr=0.1, first_order=True)
    assert model.first_order


def test_batch_normalization_nested_in_a_submodel_is_found():
    inner = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization()])
    outer = keras.Sequential([keras.Input((4,)), inner, keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="BatchNormalization"):
        MAML(outer, inner_lr=0.1)


def test_unbuilt_learner_is_refused():
    with pytest.raises(ValueError, match="built learner"):
        MAML(keras.Sequential([keras.layers.Dense(1)]), inner_lr=0.1)


def test_mlp_is_the_papers_sinusoid_network():
    model = learners.mlp()
    assert [v.shape for v in model.trainable_variables] == [
        (1, 40),
        (40,),
        (40, 40),
        (40,),
        (40, 1),
        (1,),
    ]


@pytest.mark.parametrize(
    "variant,image_shape,filters,params",
    [
        # 4 x (3x3 conv without bias + gamma/beta), 64 filters, then 64 -> 5 dense.
        (
            "strided",
            (28, 28, 1),
            64,
            (9 * 1 * 64 + 128) + 3 * (9 * 64 * 64 + 128) + 64 * 5 + 5,
        ),
        # 84x84 images, 32 filters: 84 -> 42 -> 21 -> 10 -> 5 after pooling, 5*5*32 -> 5.
        (
            "maxpool",
            (84, 84, 3),
            32,
            (9 * 3 * 32 + 64) + 3 * (9 * 32 * 32 + 64) + 800 * 5 + 5,
        ),
    ],
)
def test_conv4_variants_have_the_papers_shapes(variant, image_shape, filters, params):
    model = learners.conv4(5, image_shape=image_shape, variant=variant, filters=filters)
    assert model.count_params() == params
    assert model(tf.zeros((2, *image_shape))).shape == (2, 5)


def test_a_subclassed_learner_works():
    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.hidden = keras.layers.Dense(8, activation="tanh")
            self.out = keras.layers.Dense(1)

        def call(self, x):
            return self.out(self.hidden(x))

    learner = Subclassed()
    learner(tf.zeros((1, 1)))
    model = MAML(learner, inner_lr=0.1)
    x = tf.random.normal((5, 1))
    weights = model.adapt(x, tf.sin(x), steps=2)
    assert [w.shape for w in weights] == [v.shape for v in learner.trainable_variables]
