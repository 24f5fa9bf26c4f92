"""Model-Agnostic Meta-Learning as a `keras.Model` whose `train_step` differentiates through SGD.

Finn, Abbeel and Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks",
ICML 2017 (arXiv:1703.03400). Symbols follow the paper's Algorithm 2:

- inner loop, per task T_i, k times:   θ'_i = θ − α ∇_θ L_support(f_θ)
- outer loop (meta-update):             θ ← θ − β ∇_θ Σ_i L_query(f_θ'_i)

The outer gradient flows through the inner updates (nested `tf.GradientTape`s), so it contains
the Hessian-vector terms: true second-order MAML. `first_order=True` stops the gradient through the
inner gradients on the same code path (FOMAML). β is the learning rate of the optimizer given to
`compile`.
"""

import collections
import numbers

import keras
import tensorflow as tf

from maml_tf import batched
from maml_tf.config import TASK_LOOPS

EPISODE_KEYS = ("support_x", "support_y", "query_x", "query_y")

TaskResults = collections.namedtuple(
    "TaskResults", ["support_loss", "query_losses", "query_accuracies"]
)
TaskResults.__doc__ = """What adapting to a batch of tasks gave, per task.

Attributes:
  support_loss: float [B], support loss at θ, before adaptation.
  query_losses: float [B, S], query loss after 0..steps inner steps when every step was
    evaluated (S = steps + 1), otherwise only after the last step (S = 1).
  query_accuracies: float [B, S] like `query_losses`, or None for regression.
"""


def mean_squared_error(y_true, y_pred):
    """Mean over all elements of (y_true − y_pred)²: the paper's sinusoid loss."""
    return tf.reduce_mean(tf.square(tf.cast(y_true, y_pred.dtype) - y_pred))


def sparse_softmax_cross_entropy(y_true, logits):
    """Mean over examples of the cross-entropy of integer labels against logits.

    The mean, not the original code's sum divided by K (shots): with N ways, the paper's α for
    Omniglot is N times smaller than the α that gives the same step here (0.4 there is 2.0 here
    for 5-way).
    """
    return tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=tf.cast(y_true, tf.int32), logits=logits
        )
    )


LOSSES = {
    "mse": (mean_squared_error, False),
    "sparse_categorical_crossentropy": (sparse_softmax_cross_entropy, True),
}


def _accuracy(y_true, logits):
    predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
    return tf.reduce_mean(tf.cast(tf.equal(predicted, tf.cast(y_true, tf.int32)), logits.dtype))


def _batch_norm_layers(model):
    return [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def _variable_positions(learner, selection):
    """Positions in `learner.trainable_variables` of the variables `selection` picks.

    Positions, not paths, are what `get_config` keeps: a deserialised learner's variable paths
    lose the model's name (`conv4_strided/norm0/beta` comes back as `norm0/beta`).
    """
    variables = learner.trainable_variables
    if selection is None:
        return ()
    if callable(selection):
        return tuple(i for i, v in enumerate(variables) if selection(v))
    by_id = {id(v): i for i, v in enumerate(variables)}
    by_path = {v.path: i for i, v in enumerate(variables)}
    positions = set()
    for item in selection:
        # numbers.Integral takes numpy's integers (np.flatnonzero); a bool is no position.
        if isinstance(item, numbers.Integral) and not isinstance(item, bool):
            if not 0 <= item < len(variables):
                raise ValueError(
                    f"outer_only: position {item} is out of range for the learner's "
                    f"{len(variables)} trainable variables"
                )
            positions.add(int(item))
        elif isinstance(item, str) and item in by_path:
            positions.add(by_path[item])
        elif id(item) in by_id:
            positions.add(by_id[id(item)])
        else:
            raise ValueError(f"outer_only: {item!r} is not a trainable variable of the learner")
    return tuple(sorted(positions))


@keras.saving.register_keras_serializable(package="maml_tf")
class MAML(keras.Model):
    """Wraps a built Keras model (the learner f_θ) and meta-trains its initial weights θ.

    Each training element is a meta-batch of B tasks, a dict of tensors:

    - `support_x`: float [B, n_support, *input_shape] (e.g. [B, n_way*k_shot, 28, 28, 1]),
    - `support_y`: [B, n_support, ...] (int labels for classification, floats for regression),
    - `query_x`: float [B, n_query, *input_shape], `query_y`: [B, n_query, ...].

    `train_step` adapts to every task with `inner_steps` SGD steps of size `inner_lr` (α) on its
    support set, and applies the gradient of the mean query loss over the B tasks with the compiled
    optimizer (whose learning rate is β). `test_step` adapts with `eval_inner_steps` and reports the
    query loss (and accuracy) after each inner step 0..eval_inner_steps, as `query_loss_step_<i>`.

    Losses are means over the examples of a set (see `sparse_softmax_cross_entropy` on how α
    relates to the original code's summed loss).

    Args:
      learner: a built `keras.Model` (Sequential, functional or subclassed) mapping a batch of
        inputs to outputs (logits for classification). Its weights are θ.
      inner_lr: α, step size of the inner SGD updates.
      inner_steps: k, inner SGD steps per task in meta-training (0 trains θ on the query sets
        without adaptation: the paper's "pretrained" baseline).
      eval_inner_steps: inner steps at evaluation and prediction (default: `inner_steps`).
      first_order: drop the second-order terms (FOMAML): the inner gradients are treated as
        constants in the meta-gradient.
      loss: "mse", "sparse_categorical_crossentropy" (from logits), or a callable
        `loss(y_true, y_pred) -> scalar` (mean over the set).
      classification: report accuracy; inferred from `loss` when it is a name.
      task_loop: how `train_step` runs the B tasks of a meta-batch: "batched" (all tasks in
        one pass with per-task weights: grouped convolutions, batched matmuls; see
        `maml_tf.batched`, for Sequential learners of common layers and the named losses),
        "map" (`tf.map_fn`, one traced task body: fast to trace), "unroll" (a Python loop:
        one graph per task; slow to trace for large B and many steps), or "auto" (batched
        where it runs grouped convolutions or no convolutions, else map). Evaluation always
        uses "map". All give the same meta-gradient up to float rounding.
      parallel_iterations: tasks `tf.map_fn` may run at once.
      outer_only: learner variables that only the outer loop learns: the inner loop leaves
        them at θ, and the meta-gradient still reaches them through every forward pass. A
        collection of variables, their paths (`variable.path`) or their positions in
        `learner.trainable_variables`, or a callable `variable -> bool`. Kept as positions
        (`self.outer_only`). None: the inner loop adapts every trainable variable (the paper's
        algorithm). The paper's code learned its normalisation offsets this way
        (`maml_tf.learners.conv4(paper_network=True)`); adapting only the head is ANIL (Raghu
        et al., 2020).

    Raises:
      ValueError: the learner is not built, contains `keras.layers.BatchNormalization` while
        `first_order` is False, or an argument is out of range.

    Example:
      >>> learner = maml_tf.learners.mlp()
      >>> model = maml_tf.MAML(learner, inner_lr=0.01, inner_steps=1, loss="mse")
      >>> model.compile(optimizer=keras.optimizers.Adam(1e-3))   # β
      >>> model.fit(maml_tf.data.sinusoid.task_dataset(...), steps_per_epoch=1000)
      >>> fast_weights = model.adapt(support_x, support_y, steps=10)
      >>> y = model.forward(fast_weights, x)
    """

    def __init__(
        self,
        learner,
        inner_lr,
        inner_steps=1,
        eval_inner_steps=None,
        first_order=False,
        loss="mse",
        classification=None,
        task_loop="auto",
        parallel_iterations=2,
        outer_only=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not learner.built or not learner.trainable_variables:
            raise ValueError(
                "MAML needs a built learner with trainable weights: call it once on a batch "
                "or give it a keras.Input."
            )
        bad_norms = _batch_norm_layers(learner)
        if bad_norms and not first_order:
            raise ValueError(
                f"The learner contains keras.layers.BatchNormalization ({bad_norms[0].name}), "
                "whose second derivatives are wrong on the TensorFlow backend (its variance "
                "treats the batch mean as a constant), so second-order MAML meta-gradients "
                "would be silently wrong. Use maml_tf.learners.TaskNormalization instead, or "
                "first_order=True (first derivatives are exact)."
            )
        if not inner_lr > 0:
            raise ValueError(f"inner_lr (α) must be > 0, got {inner_lr}")
        if inner_steps < 0:
            raise ValueError(f"inner_steps must be >= 0, got {inner_steps}")
        if eval_inner_steps is not None and eval_inner_steps < 0:
            raise ValueError(f"eval_inner_steps must be >= 0, got {eval_inner_steps}")
        if task_loop not in TASK_LOOPS:
            raise ValueError(f"task_loop must be one of {TASK_LOOPS}, got {task_loop!r}")
        why_not_batched = batched.unsupported_layers(learner)
        if not isinstance(loss, str):
            why_not_batched.append("a custom loss")
        if task_loop == "batched" and why_not_batched:
            raise ValueError(f"task_loop='batched' cannot run this learner: {why_not_batched}")
        if task_loop == "auto":
            # Batched with one convolution per task (learners that max-pool, or a TensorFlow
            # that cannot differentiate grouped convolutions; see maml_tf.batched) is no faster
            # than map and needs more memory.
            fast = not why_not_batched and batched.grouped_by_default(learner)
            task_loop = "batched" if fast else "map"

        if isinstance(loss, str):
            if loss not in LOSSES:
                raise ValueError(
                    f"loss must be one of {sorted(LOSSES)} or a callable, got {loss!r}"
                )
            self.loss_name = loss
            self.loss_fn, inferred = LOSSES[loss]
        else:
            self.loss_name = getattr(loss, "__name__", "custom")
            self.loss_fn, inferred = loss, False
        self.classification = inferred if classification is None else bool(classification)

        self.learner = learner
        self.inner_lr = float(inner_lr)
        self.inner_steps = int(inner_steps)
        self.eval_inner_steps = int(inner_steps if eval_inner_steps is None else eval_inner_steps)
        self.first_order = bool(first_order)
        self.task_loop = task_loop
        self.parallel_iterations = int(parallel_iterations)
        self.compute_dtype_ = learner.trainable_variables[0].dtype
        self._batched = None if why_not_batched else batched.BatchedLearner(learner)
        self.outer_only = _variable_positions(learner, outer_only)
        # Aligned with learner.trainable_variables: which ones the inner loop updates.
        self._adapted = [i not in self.outer_only for i in range(len(learner.trainable_variables))]
        if not any(self._adapted):
            raise ValueError("outer_only names every trainable variable: nothing left to adapt")

        self.query_loss_tracker = keras.metrics.Mean(name="query_loss")
        self.support_loss_tracker = keras.metrics.Mean(name="support_loss")
        self.query_accuracy_tracker = (
            keras.metrics.Mean(name="query_accuracy") if self.classification else None
        )
        steps = range(self.eval_inner_steps + 1)
        self.step_loss_trackers = [keras.metrics.Mean(name=f"query_loss_step_{i}") for i in steps]
        self.step_accuracy_trackers = (
            [keras.metrics.Mean(name=f"query_accuracy_step_{i}") for i in steps]
            if self.classification
            else []
        )
        # The learner is built, so this wrapper is too: without it `fit` under a distribution
        # strategy, `export` and optimizer-state restore fail.
        self.built = True

    # ----------------------------------------------------------------------------- the algorithm

    def forward(self, weights, x, training=True):
        """Runs the learner at the given weights.

        Args:
          weights: list of tensors, one per `learner.trainable_variables` (θ or fast weights θ').
          x: float [n, *input_shape].
          training: passed to the learner's layers.

        Returns:
          The learner's outputs [n, ...] at `weights`.
        """
        x = tf.cast(x, self.compute_dtype_)
        non_trainable = [v.value for v in self.learner.non_trainable_variables]
        # stateless_call calls `call()` directly, which may not take `training`.
        kwargs = {"training": training} if self.learner._call_has_training_arg else {}
        outputs, _ = self.learner.stateless_call(weights, non_trainable, x, **kwargs)
        return outputs

    def _sgd_step(self, weights, x, y, first_order, forward, loss_fn):
        """θ' = θ − α ∇_θ L(θ) for one task, or for B tasks at once.

        With per-task weights [B, ...] and per-task losses [B], the gradient of the summed loss
        is each task's own gradient, since the tasks do not interact: the same code serves
        both forms.

        Returns:
          (θ', L(θ)): the new weights and the loss(es) before the step.
        """
        adapted = [w for w, a in zip(weights, self._adapted, strict=True) if a]
        with tf.GradientTape() as tape:
            tape.watch(adapted)
            losses = loss_fn(y, forward(weights, x))
            total = tf.reduce_sum(losses)
        grads = tape.gradient(total, adapted, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        if first_order:
            grads = [tf.stop_gradient(g) for g in grads]
        alpha = tf.constant(self.inner_lr, dtype=self.compute_dtype_)
        grads = iter(grads)
        new = [
            w - alpha * next(grads) if a else w for w, a in zip(weights, self._adapted, strict=True)
        ]
        return new, losses

    def theta(self):
        """θ: the learner's current weights, as tensors that a surrounding tape can trace."""
        return [tf.convert_to_tensor(v) for v in self.learner.trainable_variables]

    def adapt(self, support_x, support_y, steps=None, first_order=None, weights=None):
        """Takes `steps` SGD steps of size α on one task's support set.

        Args:
          support_x: float [n_support, *input_shape].
          support_y: [n_support, ...] targets.
          steps: inner steps (default `eval_inner_steps`).
          first_order: stop the gradient through the inner gradients (default: as constructed).
          weights: where to start (default θ).

        Returns:
          The fast weights θ': a list of tensors aligned with `learner.trainable_variables`.
          When called under a `tf.GradientTape` watching θ, they stay differentiable in θ.
        """
        steps = self.eval_inner_steps if steps is None else int(steps)
        first_order = self.first_order if first_order is None else first_order
        weights = self.theta() if weights is None else list(weights)
        for _ in range(steps):
            weights, _ = self._sgd_step(
                weights, support_x, support_y, first_order, self.forward, self.loss_fn
            )
        return weights

    def _adapt_and_evaluate(self, weights, task, steps, first_order, every_step, forward, kind):
        """Inner loop and query evaluation, for one task or (kind "batched") B tasks at once.

        Returns:
          (support_loss, query_losses, query_accuracies): the support loss before adapting, and
          query results stacked on a last axis of size 1 or steps + 1 (accuracies None for
          regression). Shapes [], [S], [S] for one task; [B], [B, S], [B, S] for B tasks.
        """
        support_x, support_y, query_x, query_y = task
        if kind == "batched":
            loss_fn, accuracy_fn = batched.LOSSES[self.loss_name], batched.accuracy
        else:
            loss_fn, accuracy_fn = self.loss_fn, _accuracy
        query_losses, query_accuracies = [], []

        def evaluate_query():
            outputs = forward(weights, query_x)
            query_losses.append(loss_fn(query_y, outputs))
            if self.classification:
                query_accuracies.append(accuracy_fn(query_y, outputs))

        support_loss = None
        for step in range(steps):
            if every_step:
                evaluate_query()
            weights, loss = self._sgd_step(
                weights, support_x, support_y, first_order, forward, loss_fn
            )
            if step == 0:
                support_loss = loss
        if support_loss is None:
            support_loss = loss_fn(support_y, forward(weights, support_x))
        evaluate_query()
        accuracies = tf.stack(query_accuracies, axis=-1) if self.classification else None
        return support_loss, tf.stack(query_losses, axis=-1), accuracies

    def _one_task(self, theta, task, steps, first_order, every_step):
        support_loss, losses, accuracies = self._adapt_and_evaluate(
            theta, task, steps, first_order, every_step, self.forward, "per_task"
        )
        # tf.map_fn needs a tensor in every output, also for regression.
        return (
            support_loss,
            losses,
            tf.zeros([0], losses.dtype) if accuracies is None else accuracies,
        )

    def task_results(
        self, episodes, steps, first_order=None, every_step=False, theta=None, task_loop=None
    ):
        """Adapts to each task of a meta-batch and evaluates its query set.

        Args:
          episodes: dict with `support_x`, `support_y`, `query_x`, `query_y` (shapes in the
            class docstring), B tasks.
          steps: inner steps per task.
          first_order: default as constructed.
          every_step: also evaluate the query set before each inner step.
          theta: the initial weights (default `self.theta()`); pass them when a tape outside
            must see this use of θ.
          task_loop: "batched", "map" or "unroll" (default: as constructed).

        Returns:
          `TaskResults` with per-task tensors.
        """
        first_order = self.first_order if first_order is None else first_order
        theta = self.theta() if theta is None else theta
        tasks = tuple(episodes[k] for k in EPISODE_KEYS)

        def run(task):
            return self._one_task(theta, task, steps, first_order, every_step)

        task_loop = task_loop or self.task_loop
        if task_loop == "batched":
            return self._batched_task_results(theta, tasks, steps, first_order, every_step)
        if task_loop == "unroll":
            batch = tasks[0].shape[0]
            if batch is None:
                raise ValueError("task_loop='unroll' needs a static meta-batch size")
            per_task = [run(tuple(t[i] for t in tasks)) for i in range(batch)]
            support_loss, query_losses, query_accs = (
                tf.stack(x) for x in zip(*per_task, strict=True)
            )
        else:
            dtype = self.compute_dtype_
            n_evals = steps + 1 if every_step else 1
            n_accs = n_evals if self.classification else 0
            support_loss, query_losses, query_accs = tf.map_fn(
                run,
                tasks,
                fn_output_signature=(
                    tf.TensorSpec([], dtype),
                    tf.TensorSpec([n_evals], dtype),
                    tf.TensorSpec([n_accs], dtype),
                ),
                parallel_iterations=self.parallel_iterations,
            )
        return TaskResults(support_loss, query_losses, query_accs if self.classification else None)

    def _batched_task_results(self, theta, tasks, steps, first_order, every_step):
        """`task_results` for all B tasks at once, with fast weights shaped [B, ...]."""
        size = tasks[0].shape[0]
        if self._batched is None:
            raise ValueError("task_loop='batched' is not available for this learner or loss")
        if size is None:
            raise ValueError("task_loop='batched' needs a static meta-batch size")
        weights = [tf.broadcast_to(t[None], [size, *t.shape]) for t in theta]

        def forward(weights, x):
            return self._batched(weights, tf.cast(x, self.compute_dtype_))

        return TaskResults(
            *self._adapt_and_evaluate(
                weights, tasks, steps, first_order, every_step, forward, "batched"
            )
        )

    def meta_loss(self, episodes, theta=None):
        """Σ_i L_query(θ'_i) / B: the objective whose θ-gradient the meta-update applies."""
        results = self.task_results(episodes, self.inner_steps, theta=theta)
        return tf.reduce_mean(results.query_losses[:, -1]), results

    def compute_meta_gradients(self, episodes):
        """∇_θ of the mean query loss after `inner_steps` adaptation, one tensor per variable."""
        variables = self.learner.trainable_variables
        with tf.GradientTape() as tape:
            loss, results = self.meta_loss(episodes)
        grads = tape.gradient(loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return grads, loss, results

    # --------------------------------------------------------------------------- Keras plumbing

    def call(self, inputs, training=False):
        """The meta-learned initialisation's forward pass f_θ(inputs) (no adaptation)."""
        return self.learner(inputs, training=training)

    def compile(self, optimizer="adam", jit_compile=False, **kwargs):
        """Like `keras.Model.compile`; the optimizer's learning rate is β.

        XLA is off by default: Keras' "auto" turns it on when a GPU is visible, and XLA's
        second derivative of max-pooling is approximate.
        """
        super().compile(optimizer=optimizer, jit_compile=jit_compile, **kwargs)
        # Creating Adam's slots now, not inside the first trace, saves a second trace of the
        # whole meta-step.
        self.optimizer.build(self.learner.trainable_variables)

    @property
    def metrics(self):
        trackers = [self.query_loss_tracker, self.support_loss_tracker]
        if self.query_accuracy_tracker is not None:
            trackers.append(self.query_accuracy_tracker)
        return trackers + self.step_loss_trackers + self.step_accuracy_trackers

    def _update_summary(self, results):
        self.query_loss_tracker.update_state(results.query_losses[:, -1])
        self.support_loss_tracker.update_state(results.support_loss)
        logs = {
            "query_loss": self.query_loss_tracker.result(),
            "support_loss": self.support_loss_tracker.result(),
        }
        if self.classification:
            self.query_accuracy_tracker.update_state(results.query_accuracies[:, -1])
            logs["query_accuracy"] = self.query_accuracy_tracker.result()
        return logs

    def train_step(self, data):
        grads, _, results = self.compute_meta_gradients(data)
        self.optimizer.apply_gradients(zip(grads, self.learner.trainable_variables, strict=True))
        return self._update_summary(results)

    def test_step(self, data):
        # Evaluating after every inner step unrolled per task would make a large graph.
        results = self.task_results(data, self.eval_inner_steps, every_step=True, task_loop="map")
        logs = self._update_summary(results)
        for i, tracker in enumerate(self.step_loss_trackers):
            tracker.update_state(results.query_losses[:, i])
            logs[tracker.name] = tracker.result()
        for i, tracker in enumerate(self.step_accuracy_trackers):
            tracker.update_state(results.query_accuracies[:, i])
            logs[tracker.name] = tracker.result()
        return logs

    def predict_step(self, data):
        """Adapts on each task's support set, then predicts its query set: [B, n_query, ...]."""
        theta = self.theta()

        def run(task):
            support_x, support_y, query_x = task
            weights = self.adapt(support_x, support_y, weights=theta)
            return self.forward(weights, query_x)

        tasks = (data["support_x"], data["support_y"], data["query_x"])
        return tf.map_fn(
            run,
            tasks,
            fn_output_signature=tf.TensorSpec(None, self.compute_dtype_),
            parallel_iterations=self.parallel_iterations,
        )

    def get_config(self):
        return {
            "learner": keras.saving.serialize_keras_object(self.learner),
            "inner_lr": self.inner_lr,
            "inner_steps": self.inner_steps,
            "eval_inner_steps": self.eval_inner_steps,
            "first_order": self.first_order,
            "loss": self.loss_name,
            "classification": self.classification,
            "task_loop": self.task_loop,
            "parallel_iterations": self.parallel_iterations,
            "outer_only": list(self.outer_only),
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["learner"] = keras.saving.deserialize_keras_object(config["learner"])
        return cls(**config)
