"""The meta-gradient that `MAML.train_step` applies, against float64 central finite differences.

The finite differences are taken of an independent, plain implementation of the MAML objective
(a per-task Python loop using only first derivatives, which are exact), not of the code under test.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from maml_tf import MAML, batched, learners

TOLERANCE = 1e-6
EPSILON = 1e-6
INNER_LR = 0.1


def regression_episodes(seed, tasks=3, support=5, query=4):
    rng = np.random.default_rng(seed)

    def draw(n):
        return tf.constant(rng.normal(size=(tasks, n, 1)), tf.float64)

    return {
        "support_x": draw(support),
        "support_y": draw(support),
        "query_x": draw(query),
        "query_y": draw(query),
    }


def image_episodes(seed, tasks=2, n_way=3, shape=(8, 8, 1)):
    rng = np.random.default_rng(seed)

    def images(n):
        return tf.constant(rng.normal(size=(tasks, n, *shape)), tf.float64)

    def labels(n):
        return tf.constant(np.stack([rng.permutation(n) % n_way for _ in range(tasks)]), tf.int32)

    return {
        "support_x": images(2 * n_way),
        "support_y": labels(2 * n_way),
        "query_x": images(n_way),
        "query_y": labels(n_way),
    }


def mse(y, prediction):
    return tf.reduce_mean(tf.square(y - prediction))


def cross_entropy(y, logits):
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))


def reference_meta_loss(learner, loss, inner_lr, steps, adapted=None):
    """θ ↦ mean_i L_query(θ'_i), written plainly, as a tf.function of a flat float64 θ.

    `adapted`: one bool per variable, False for those the inner loop leaves at θ (all True
    by default).
    """
    adapted = adapted or [True] * len(learner.trainable_variables)
    shapes = [v.shape for v in learner.trainable_variables]
    sizes = [int(np.prod(s)) for s in shapes]

    @tf.function
    def meta_loss(flat_theta, episodes):
        theta = [tf.reshape(t, s) for t, s in zip(tf.split(flat_theta, sizes), shapes, strict=True)]
        total = tf.constant(0.0, tf.float64)
        tasks = episodes["support_x"].shape[0]
        for i in range(tasks):
            weights = theta
            for _ in range(steps):
                with tf.GradientTape() as tape:
                    tape.watch(weights)
                    out, _ = learner.stateless_call(
                        weights, [], episodes["support_x"][i], training=True
                    )
                    support_loss = loss(episodes["support_y"][i], out)
                grads = tape.gradient(
                    support_loss, weights, unconnected_gradients=tf.UnconnectedGradients.ZERO
                )
                weights = [
                    w - inner_lr * g if a else w
                    for w, g, a in zip(weights, grads, adapted, strict=True)
                ]
            out, _ = learner.stateless_call(weights, [], episodes["query_x"][i], training=True)
            total += loss(episodes["query_y"][i], out)
        return total / tasks

    return meta_loss


def finite_difference_gradient(learner, loss, inner_lr, steps, episodes, adapted=None):
    """Central differences of the reference objective in every coordinate of θ."""
    meta_loss = reference_meta_loss(learner, loss, inner_lr, steps, adapted)
    theta = np.concatenate([v.numpy().ravel() for v in learner.trainable_variables])
    gradient = np.zeros_like(theta)
    for j in range(theta.size):
        step = np.zeros_like(theta)
        step[j] = EPSILON
        plus = meta_loss(tf.constant(theta + step), episodes)
        minus = meta_loss(tf.constant(theta - step), episodes)
        gradient[j] = (plus.numpy() - minus.numpy()) / (2 * EPSILON)
    return gradient


def applied_meta_gradient(model, episodes):
    """Runs one real `fit` step with SGD(β = 1): θ_before − θ_after is the applied gradient."""
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=1.0))
    before = [v.numpy().copy() for v in model.learner.trainable_variables]
    one_batch = tf.data.Dataset.from_tensors(episodes)
    model.fit(one_batch, epochs=1, steps_per_epoch=1, shuffle=False, verbose=0)
    after = [v.numpy() for v in model.learner.trainable_variables]
    for variable, value in zip(model.learner.trainable_variables, before, strict=True):
        variable.assign(value)
    return np.concatenate([(b - a).ravel() for b, a in zip(before, after, strict=True)])


def relative_errors(learner, analytic, numeric):
    """Per variable: max |analytic − numeric| over its entries / max |numeric| over its entries.

    A variable whose gradient is zero in exact arithmetic (a convolution bias followed by
    normalisation) has only round-off for gradient; its error is taken relative to 1e-3 of the
    largest gradient entry of all variables instead.
    """
    floor = 1e-3 * np.max(np.abs(numeric))
    errors, start = {}, 0
    for variable in learner.trainable_variables:
        size = int(np.prod(variable.shape))
        a, n = analytic[start : start + size], numeric[start : start + size]
        errors[variable.path] = np.max(np.abs(a - n)) / max(np.max(np.abs(n)), floor)
        start += size
    return errors


def mlp_case():
    keras.utils.set_random_seed(3)
    return learners.mlp(hidden=(8, 8), dtype="float64"), "mse", mse, regression_episodes(0)


def conv_case(variant, paper_network=False):
    keras.utils.set_random_seed(4)
    learner = learners.conv4(
        3,
        image_shape=(8, 8, 1),
        variant=variant,
        filters=3,
        blocks=2,
        dtype="float64",
        paper_network=paper_network,
    )
    # Away from their initial 1 and 0, so that every term of the normalisation's derivatives
    # that contains gamma or beta is checked, not only those that survive gamma = 1.
    rng = np.random.default_rng(5)
    for variable in learner.trainable_variables:
        if variable.name in ("gamma", "beta"):
            variable.assign(rng.uniform(0.5, 1.5, variable.shape) * rng.choice([-1, 1]))
    return learner, "sparse_categorical_crossentropy", cross_entropy, image_episodes(1)


CASES = {
    "mlp": mlp_case,
    "conv_maxpool": lambda: conv_case("maxpool"),
    "conv_strided": lambda: conv_case("strided"),
}


@pytest.mark.parametrize(
    "case,steps,task_loop",
    [
        ("mlp", 1, "map"),
        ("mlp", 3, "map"),
        ("mlp", 3, "unroll"),
        ("conv_maxpool", 2, "map"),
        ("conv_strided", 2, "map"),
        ("conv_strided", 2, "unroll"),
        # The task-batched path; in float64 its convolutions run per task (no float64 gradient
        # kernels for grouped convolutions on CPU): the grouped form is checked further down.
        ("mlp", 3, "batched"),
        ("conv_maxpool", 2, "batched"),
        ("conv_strided", 2, "batched"),
    ],
)
def test_second_order_meta_gradient_matches_finite_differences(case, steps, task_loop):
    learner, loss_name, loss, episodes = CASES[case]()
    model = MAML(learner, INNER_LR, inner_steps=steps, loss=loss_name, task_loop=task_loop)
    analytic = applied_meta_gradient(model, episodes)
    numeric = finite_difference_gradient(learner, loss, INNER_LR, steps, episodes)
    errors = relative_errors(learner, analytic, numeric)
    assert max(errors.values()) <= TOLERANCE, errors


# Variables only the outer loop learns (`outer_only`): the paper network's normalisation
# offsets, and everything but the head (ANIL).
OUTER_ONLY_CASES = {
    "paper_offsets": (
        lambda: conv_case("strided", paper_network=True),
        learners.normalization_offsets,
    ),
    "head_only": (mlp_case, lambda learner: learner.trainable_variables[:-2]),
}


@pytest.mark.parametrize("task_loop", ["map", "batched"])
@pytest.mark.parametrize("case", sorted(OUTER_ONLY_CASES))
def test_outer_only_meta_gradient_matches_finite_differences(case, task_loop):
    build, select = OUTER_ONLY_CASES[case]
    learner, loss_name, loss, episodes = build()
    outer_only = select(learner)
    model = MAML(learner, INNER_LR, 2, loss=loss_name, task_loop=task_loop, outer_only=outer_only)
    adapted = [all(v is not o for o in outer_only) for v in learner.trainable_variables]
    assert not all(adapted) and any(adapted)
    analytic = applied_meta_gradient(model, episodes)
    numeric = finite_difference_gradient(learner, loss, INNER_LR, 2, episodes, adapted)
    errors = relative_errors(learner, analytic, numeric)
    assert max(errors.values()) <= TOLERANCE, errors
    # The check can fail: adapting every variable (checked above) is another objective.
    everything = applied_meta_gradient(
        MAML(learner, INNER_LR, 2, loss=loss_name, task_loop=task_loop), episodes
    )
    assert max(relative_errors(learner, analytic, everything).values()) > 1e-3


@pytest.mark.parametrize("case", sorted(OUTER_ONLY_CASES))
def test_outer_only_second_order_differs_from_first_order(case):
    build, select = OUTER_ONLY_CASES[case]
    learner, loss_name, _, episodes = build()
    outer_only = select(learner)
    second = applied_meta_gradient(
        MAML(learner, INNER_LR, 2, loss=loss_name, outer_only=outer_only), episodes
    )
    first = applied_meta_gradient(
        MAML(learner, INNER_LR, 2, loss=loss_name, first_order=True, outer_only=outer_only),
        episodes,
    )
    assert np.linalg.norm(second - first) > 1e-2 * np.linalg.norm(second)


@pytest.mark.parametrize("case", ["mlp", "conv_maxpool"])
def test_first_order_gradient_fails_the_finite_difference_check(case):
    # The check above must be able to fail: FOMAML's gradient is not the gradient of the
    # MAML objective.
    learner, loss_name, loss, episodes = CASES[case]()
    model = MAML(learner, INNER_LR, inner_steps=2, loss=loss_name, first_order=True)
    analytic = applied_meta_gradient(model, episodes)
    numeric = finite_difference_gradient(learner, loss, INNER_LR, 2, episodes)
    errors = relative_errors(learner, analytic, numeric)
    assert max(errors.values()) > 1e-2, errors


@pytest.mark.parametrize("case", ["mlp", "conv_strided"])
def test_second_order_differs_from_first_order(case):
    learner, loss_name, _, episodes = CASES[case]()
    second = applied_meta_gradient(MAML(learner, INNER_LR, 2, loss=loss_name), episodes)
    first = applied_meta_gradient(
        MAML(learner, INNER_LR, 2, loss=loss_name, first_order=True), episodes
    )
    assert np.linalg.norm(second - first) > 1e-2 * np.linalg.norm(second)


def test_first_order_matches_hand_computed_reference():
    # FOMAML with one inner step: the meta-gradient is ∇L_query evaluated at θ' = θ − α∇L_support.
    learner, loss_name, loss, episodes = mlp_case()
    model = MAML(learner, INNER_LR, inner_steps=1, loss=loss_name, first_order=True)
    analytic = applied_meta_gradient(model, episodes)
    theta = [tf.convert_to_tensor(v) for v in learner.trainable_variables]
    expected = []
    for i in range(episodes["support_x"].shape[0]):
        with tf.GradientTape() as tape:
            tape.watch(theta)
            out, _ = learner.stateless_call(theta, [], episodes["support_x"][i], training=True)
            support_loss = loss(episodes["support_y"][i], out)
        grads = tape.gradient(support_loss, theta)
        fast = [w - INNER_LR * g for w, g in zip(theta, grads, strict=True)]
        with tf.GradientTape() as tape:
            tape.watch(fast)
            out, _ = learner.stateless_call(fast, [], episodes["query_x"][i], training=True)
            query_loss = loss(episodes["query_y"][i], out)
        grads = tape.gradient(query_loss, fast)
        expected.append(np.concatenate([g.numpy().ravel() for g in grads]))
    np.testing.assert_allclose(analytic, np.mean(expected, axis=0), rtol=1e-10, atol=1e-12)


def test_map_and_unroll_task_loops_give_the_same_meta_gradient():
    learner, loss_name, _, episodes = conv_case("maxpool")
    mapped = applied_meta_gradient(MAML(learner, INNER_LR, 2, loss=loss_name), episodes)
    unrolled = applied_meta_gradient(
        MAML(learner, INNER_LR, 2, loss=loss_name, task_loop="unroll"), episodes
    )
    np.testing.assert_allclose(mapped, unrolled, rtol=1e-10, atol=1e-13)


# Float32 checks of the task-batched path at the real network sizes, against the float64
# meta-gradient of the same weights: each variable's largest difference relative to its largest
# gradient entry. The batched path must be within FLOAT32_TOLERANCE of it or, where float32 itself
# is further off, no further than twice the plain per-task path. Float32's own error depends on
# the case and the CPU's kernels: on an AVX-512 machine (2026-12-05) both float32 paths of the
# max-pool case below were 1.7e-3 from the float64 meta-gradient, and 2.5e-4 from each other, with
# oneDNN's kernels (the default there), and 1.5e-5 to 1.6e-5 with TF_ENABLE_ONEDNN_OPTS=0; with
# one inner step the plain path was 3e-6 to 1e-5 off with either set of kernels. Over five other
# seeds of the same case (two steps, α = 2.0 and 0.4) the plain path was 1e-5 to 1.1e-2 off with
# either set, so it is float32 rounding through two second-order steps of max-pooling, not one
# library's kernel.
FLOAT32_TOLERANCE = 1e-4


def omniglot_like_episodes(seed, tasks, n_way, n_query):
    rng = np.random.default_rng(seed)
    return {
        "support_x": tf.constant(rng.uniform(size=(tasks, n_way, 28, 28, 1)), tf.float32),
        "support_y": tf.constant(np.tile(np.arange(n_way), (tasks, 1)), tf.int32),
        "query_x": tf.constant(rng.uniform(size=(tasks, n_way * n_query, 28, 28, 1)), tf.float32),
        "query_y": tf.constant(np.tile(np.arange(n_way).repeat(n_query), (tasks, 1)), tf.int32),
    }


@pytest.mark.parametrize(
    "variant,grouped,steps,first_order",
    [
        ("strided", True, 2, False),
        ("strided", True, 2, True),
        ("maxpool", False, 2, False),
    ],
)
def test_batched_path_is_as_exact_as_the_per_task_path_in_float32(
    variant, grouped, steps, first_order
):
    keras.utils.set_random_seed(5)
    learner = learners.conv4(5, variant=variant)
    exact_learner = learners.conv4(5, variant=variant, dtype="float64")
    exact_learner.set_weights([w.astype(np.float64) for w in learner.get_weights()])
    episodes = omniglot_like_episodes(0, tasks=4, n_way=5, n_query=2)

    def meta_gradient(task_loop, learner=learner, episodes=episodes):
        model = MAML(
            learner,
            2.0,
            steps,
            loss="sparse_categorical_crossentropy",
            first_order=first_order,
            task_loop=task_loop,
        )
        if task_loop == "batched":
            # Grouped where this TensorFlow can differentiate it, else per task (batched.py).
            works = batched.grouped_convolution_gradients_work()
            assert model._batched.grouped_convolutions == (grouped and works)
        grads = tf.function(model.compute_meta_gradients)(episodes)[0]
        return np.concatenate([g.numpy().ravel() for g in grads])

    exact = meta_gradient(
        "map",
        learner=exact_learner,
        episodes={
            k: tf.cast(v, tf.float64) if v.dtype.is_floating else v for k, v in episodes.items()
        },
    )
    plain_error = max(relative_errors(learner, meta_gradient("map"), exact).values())
    assert plain_error <= 1e-2, plain_error
    errors = relative_errors(learner, meta_gradient("batched"), exact)
    assert max(errors.values()) <= max(FLOAT32_TOLERANCE, 2 * plain_error), (plain_error, errors)


def test_the_grouped_convolution_probe_agrees_with_a_conv4_sized_gradient():
    # 4 tasks of 64 channels folded into 256, as the batched conv4 runs them.
    x = tf.random.normal([5, 14, 14, 4 * 64])
    kernel = tf.random.normal([3, 3, 64, 4 * 64])
    with tf.GradientTape() as tape:
        tape.watch([x, kernel])
        loss = tf.reduce_sum(tf.nn.conv2d(x, kernel, strides=2, padding="SAME"))
    try:
        gradients = tape.gradient(loss, [x, kernel])
        worked = all(bool(tf.reduce_all(tf.math.is_finite(g))) for g in gradients)
    except tf.errors.InvalidArgumentError:
        worked = False
    assert batched.grouped_convolution_gradients_work() == worked


@pytest.mark.parametrize(
    "learner,loss,expected",
    [
        # Grouped convolutions where TensorFlow can differentiate them, else map (batched.py).
        (
            lambda: learners.conv4(5),
            "sparse_categorical_crossentropy",
            "batched" if batched.grouped_convolution_gradients_work() else "map",
        ),
        (lambda: learners.mlp(), "mse", "batched"),
        # Max-pooling learners run per-task convolutions when batched: map is as fast.
        (lambda: learners.conv4(5, variant="maxpool"), "sparse_categorical_crossentropy", "map"),
        (lambda: learners.mlp(), lambda y, p: tf.reduce_mean((y - p) ** 2), "map"),
    ],
)
def test_auto_picks_the_batched_path_where_it_pays(learner, loss, expected):
    assert MAML(learner(), 0.1, loss=loss).task_loop == expected


def test_the_batched_dense_path_runs_no_einsum():
    # TensorFlow 2.21's oneDNN Einsum kernel crashed the batched sinusoid path now and then
    # (maml_tf/batched.py); its Dense layers use BatchMatMulV2, in the meta-gradient too.
    learner = learners.mlp(hidden=(8, 8), dtype="float64")
    model = MAML(learner, INNER_LR, 2, loss="mse", task_loop="batched")
    function = tf.function(model.compute_meta_gradients)
    graph_def = function.get_concrete_function(regression_episodes(0)).graph.as_graph_def()
    nested = [node for f in graph_def.library.function for node in f.node_def]
    op_types = {node.op for node in [*graph_def.node, *nested]}
    assert "BatchMatMulV2" in op_types and "Einsum" not in op_types
