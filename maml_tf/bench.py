"""Speed benchmark of MAML's meta-training step: time per meta-step, tracing, memory, FLOPs.

    python -m maml_tf.bench                                  # every configuration and task_loop
    python -m maml_tf.bench --configs=P1,sinusoid --task_loops=map --steps=20
    python -m maml_tf.bench --intra_op_threads=2 --output=bench.jsonl
    python -m maml_tf.bench --configs=P5 --task_loops=map --onednn=on,off   # oneDNN or not

Prints one JSON line per (configuration, task_loop, oneDNN setting) on stdout; logs go to
stderr. Each configuration runs in its own process (`python -m maml_tf.bench --config=NAME
--task_loop=LOOP`, started by the parent), so its peak RSS is its own and no graph, thread
pool or allocator cache carries over from one measurement to the next.

What is timed is the function `fit` runs: `model.make_train_function()` builds Keras' compiled
train function (a `tf.function` around `MAML.train_step` and `optimizer.apply_gradients`), and
each meta-step is one call of it on an iterator over a `tf.data.Dataset`, as in `fit`; only the
callbacks and the progress bar are left out. The data are random tensors of the real shapes
(labels class-major: N-way K-shot gives 0,..,0,1,..,1,..), repeated, so no data loading is timed.

A record's fields:

- `config`, `task_loop` (as requested), `task_loop_resolved` (what `MAML` runs: "auto" becomes
  another loop), `order` ("second" or "first"), and the configuration's hyperparameters;
- `first_call_s`: the first call of the train function, i.e. tracing, graph optimisation and
  the first meta-step; `trace_s_estimate` is that minus the median step; `traces`: how often
  `train_step` was traced (1: `MAML.compile` creates Adam's variables, so the first trace
  creates none and `tf.function` need not trace again without them; more means retracing);
- `step_ms_median`, `step_ms_p10`, `step_ms_p25`, `step_ms_p75`, `step_ms_p90`, `step_ms_min`,
  `step_ms_max`, `step_ms_all`: ms per meta-step over `steps` calls after `warmup` calls;
- `peak_rss_mib` (`resource.getrusage(RUSAGE_SELF).ru_maxrss` at the end of the timed steps, the
  whole process: Python, TensorFlow and this configuration) and `peak_rss_before_model_mib`
  (the same, just before the model was built, after the first matrix products);
- `rss_after_warmup_mib`, `rss_after_steps_mib` and `rss_mib_by_step` (resident memory after
  the warm-up, after the timed steps, and after every tenth of them): growth over a long run
  (`--steps=2000`) would show a leak or retracing;
- `flops_per_step` (analytic, see `meta_step_flops`), its `flops_formula`, `matmul_gflops` (the
  median rate of a float32 matrix product timed in the same process, `matmul_repeats` times
  before building the model and as often after the steps, as the machine's practical peak;
  `matmul_gflops_before` and `matmul_gflops_after` show how the load moved;
  `matmul_parallel_products` products run side by side when the intra-op pool is smaller than
  the machine, so that the rate stays the machine's),
  `achieved_gflops` (`flops_per_step` / median step time) and `fraction_of_matmul_peak`;
- `onednn_requested` (the `--onednn` value the child ran with: `default` leaves
  `TF_ENABLE_ONEDNN_OPTS` as it is) and `onednn` (whether TensorFlow then ran oneDNN kernels;
  null where it cannot tell);
- `inter_op_threads`, `intra_op_threads` (0: TensorFlow's default), `cpu_count`, the 1-minute
  load average before and after (other jobs make timings noisy), `timestamp` (UTC),
  `tf_version`, `keras_version`, `python_version`;
- `warmup_ms`, `last_query_loss` (finite, or the numbers time something odd), and `process_s`
  (the child process's wall time, from the parent).

A run that failed gives a line with `config`, `task_loop`, `onednn_requested` and `error` only,
and the exit status is 1 once every configuration has run.
"""

import dataclasses
import datetime
import importlib
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import time

import numpy as np
from absl import app, flags, logging

from maml_tf.config import ONEDNN_ENV, ONEDNN_NAMES
from maml_tf.errors import UserError

# TensorFlow is imported inside the functions that need it: the parent process only starts
# children, and flag errors are then reported before TensorFlow spends seconds loading.

FIRST_ORDER_SUFFIX = "-FO"
FIRST_ORDER_CHOICES = ("configured", "all", "none")
# Pass-through flags from the parent to each child process.
_CHILD_FLAGS = (
    "steps",
    "warmup",
    "seed",
    "inter_op_threads",
    "intra_op_threads",
    "matmul_size",
    "matmul_repeats",
)

FLOPS_CONVENTION = (
    "F(n) = 2 FLOPs x multiply-adds of the learner's Conv/Dense layers on n examples "
    "(normalisation, activations, pooling, losses and the optimizer are not counted); "
    "backward = 2F; one inner step = F(s) + 2F(s) = 3F(s); query forward + backward = 3F(q); "
    "second order adds the backward through every inner step's gradient computation, "
    "2 x 3F(s) = 6F(s) (the Hessian-vector products); per meta-step of B tasks with k inner "
    "steps, s support and q query examples: second order B*(9k*F(s) + 3F(q)), "
    "first order B*(3k*F(s) + 3F(q))"
)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One benchmarked meta-training setting.

    Attributes:
      name: e.g. "P1"; a name ending in "-FO" is the first-order variant of another.
      description: one line for humans.
      learner: "conv4" (classification) or "mlp" (sinusoid regression).
      meta_batch_size: B, tasks per meta-step.
      inner_steps: k, inner SGD steps per task.
      inner_lr: α (on the mean loss).
      first_order: FOMAML instead of second-order MAML.
      n_way: N, classes per task (conv4); 1 for regression, so that a task has
        n_way * k_shot support and n_way * n_query query examples either way.
      k_shot: support examples per class (per task for mlp).
      n_query: query examples per class (per task for mlp).
      image_shape: (height, width, channels) for conv4.
      conv_variant: "strided" or "maxpool" for conv4.
      filters: filters per conv4 layer.
      paper_network: conv4 as the paper's code built it (`learners.conv4(paper_network=True)`,
        normalisation offsets adapted by the outer loop only), as `--paper_network` trains it.
    """

    name: str
    description: str
    learner: str
    meta_batch_size: int
    inner_steps: int
    inner_lr: float
    first_order: bool = False
    n_way: int = 1
    k_shot: int = 1
    n_query: int = 1
    image_shape: tuple = (28, 28, 1)
    conv_variant: str = "strided"
    filters: int = 64
    paper_network: bool = False

    @property
    def classification(self):
        return self.learner == "conv4"

    @property
    def order(self):
        return "first" if self.first_order else "second"

    @property
    def support_size(self):
        """Support examples per task (s)."""
        return self.n_way * self.k_shot

    @property
    def query_size(self):
        """Query examples per task (q)."""
        return self.n_way * self.n_query

    @property
    def loss(self):
        return "sparse_categorical_crossentropy" if self.classification else "mse"


CONFIGS = {
    c.name: c
    for c in [
        BenchConfig(
            "P1",
            "Omniglot 5-way 1-shot, strided conv4, 1 query/class, B=32, k=1",
            learner="conv4",
            meta_batch_size=32,
            inner_steps=1,
            inner_lr=2.0,
            n_way=5,
        ),
        BenchConfig(
            "P1" + FIRST_ORDER_SUFFIX,
            "P1, first order",
            learner="conv4",
            meta_batch_size=32,
            inner_steps=1,
            inner_lr=2.0,
            first_order=True,
            n_way=5,
        ),
        BenchConfig(
            "P2",
            "Omniglot 20-way 1-shot, strided conv4, 1 query/class, B=16, k=5",
            learner="conv4",
            meta_batch_size=16,
            inner_steps=5,
            inner_lr=2.0,
            n_way=20,
        ),
        BenchConfig(
            "P3",
            "5-way 1-shot, maxpool conv4, 15 queries/class, B=32, k=5",
            learner="conv4",
            meta_batch_size=32,
            inner_steps=5,
            inner_lr=2.0,
            n_way=5,
            n_query=15,
            conv_variant="maxpool",
        ),
        BenchConfig(
            "P4",
            "Omniglot 5-way 5-shot, the paper's conv4 (--paper_network), 5 queries/class, "
            "B=32, k=1",
            learner="conv4",
            meta_batch_size=32,
            inner_steps=1,
            inner_lr=2.0,
            n_way=5,
            k_shot=5,
            n_query=5,
            paper_network=True,
        ),
        BenchConfig(
            "P5",
            "Omniglot 20-way 5-shot, strided conv4, 5 queries/class, B=16, k=5",
            learner="conv4",
            meta_batch_size=16,
            inner_steps=5,
            inner_lr=2.0,
            n_way=20,
            k_shot=5,
            n_query=5,
        ),
        BenchConfig(
            "sinusoid",
            "sinusoid regression, MLP 1-40-40-1, K=10 support and 10 query points, B=25, k=1",
            learner="mlp",
            meta_batch_size=25,
            inner_steps=1,
            inner_lr=0.01,
            k_shot=10,
            n_query=10,
        ),
    ]
}


def config_by_name(name):
    """The configuration called `name`; "X-FO" is the first-order variant of any "X".

    Raises:
      ValueError: unknown name.
    """
    if name in CONFIGS:
        return CONFIGS[name]
    base = name.removesuffix(FIRST_ORDER_SUFFIX)
    if name.endswith(FIRST_ORDER_SUFFIX) and base in CONFIGS:
        return dataclasses.replace(
            CONFIGS[base],
            name=name,
            description=f"{base}, first order",
            first_order=True,
        )
    known = ", ".join(list(CONFIGS) + [f"<any>{FIRST_ORDER_SUFFIX}"])
    raise ValueError(f"unknown bench configuration {name!r}; known: {known}")


def default_config_names(first_order="configured"):
    """Configuration names to run when `--configs` is not given.

    Args:
      first_order: "configured" (the table in `CONFIGS`, whose only first-order entry is P1-FO),
        "all" (also a first-order variant of every second-order configuration) or "none".
    """
    if first_order not in FIRST_ORDER_CHOICES:
        raise ValueError(f"first_order must be one of {FIRST_ORDER_CHOICES}, got {first_order!r}")
    if first_order == "configured":
        return list(CONFIGS)
    second = [name for name, c in CONFIGS.items() if not c.first_order]
    if first_order == "none":
        return second
    return [n for name in second for n in (name, name + FIRST_ORDER_SUFFIX)]


def default_task_loops():
    """The `task_loop` values `MAML` accepts, read now so that new ones are benchmarked too."""
    return tuple(importlib.import_module("maml_tf.maml").TASK_LOOPS)


# ----------------------------------------------------------------------------------- FLOPs


def forward_flops(learner, n=1):
    """Analytic FLOPs of the learner's forward pass on `n` examples.

    Counts the multiply-adds (MACs) of Conv1D/2D/3D and Dense layers, 2 FLOPs each:
    a convolution costs, per example, prod(output shape) x prod(kernel shape[:-1]) MACs
    (output positions x output channels x kernel height x width x input channels per group);
    a dense layer prod(output shape) x input features. Bias additions, normalisation,
    activations, pooling and the loss are not counted: they are elementwise and small next
    to the convolutions.

    Args:
      learner: a built Keras model whose layers know their output shapes (Sequential or
        functional; nested models are walked).
      n: examples in the batch.

    Returns:
      int, FLOPs.

    Raises:
      ValueError: a layer has a kernel this function cannot count (transposed, depthwise or
        separable convolutions, EinsumDense), or a layer's output shape is unknown (subclassed
        models, shared layers).
    """
    import keras

    counted = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D, keras.layers.Dense)
    macs = 0
    for layer in learner._flatten_layers(include_self=False, recursive=True):
        if not isinstance(layer, counted):
            # Refuse to undercount silently: anything else with a kernel does real work.
            if any(hasattr(layer, a) for a in ("kernel", "depthwise_kernel", "pointwise_kernel")):
                raise ValueError(
                    f"forward_flops cannot count layer {layer.name} ({type(layer).__name__})"
                )
            continue
        try:
            output_shape = tuple(layer.output.shape[1:])
        except (AttributeError, ValueError) as error:
            raise ValueError(
                f"forward_flops needs the output shape of layer {layer.name}: use a "
                "Sequential or functional learner built on a keras.Input"
            ) from error
        if any(d is None for d in output_shape):
            raise ValueError(f"layer {layer.name} has an unknown output shape {output_shape}")
        macs += int(np.prod(output_shape)) * int(np.prod(layer.kernel.shape[:-1]))
    return 2 * macs * n


def meta_step_flops(config, learner):
    """Analytic FLOPs of one meta-step (all B tasks), with the formula used.

    With F(n) = `forward_flops(learner, n)`, s support and q query examples per task,
    k inner steps and B tasks, and the convention backward ≈ 2 x forward:

    - each inner step: forward and backward on the support set, F(s) + 2F(s) = 3F(s);
    - the query set at the adapted weights: F(q) + 2F(q) = 3F(q);
    - second order only: the meta-gradient also flows back through every inner step's gradient
      computation; reverse mode through a computation costs about twice that computation, so
      2 x 3F(s) = 6F(s) per inner step (the Hessian-vector products).

    Second order: B * (9k * F(s) + 3F(q)). First order: B * (3k * F(s) + 3F(q)).
    The optimizer's update (a few FLOPs per weight) is not counted.

    Args:
      config: a `BenchConfig`.
      learner: the built learner of that configuration.

    Returns:
      (flops, formula): int FLOPs, and the formula with this configuration's numbers as a str.
    """
    s, q = config.support_size, config.query_size
    b, k = config.meta_batch_size, config.inner_steps
    per_inner_step = 3 if config.first_order else 9
    flops = b * (per_inner_step * k * forward_flops(learner, s) + 3 * forward_flops(learner, q))
    formula = (
        f"{config.order} order: B*({per_inner_step}k*F(s) + 3F(q)) = "
        f"{b}*({per_inner_step}*{k}*F({s}) + 3*F({q})), "
        f"F(1) = {forward_flops(learner, 1)}. Convention: {FLOPS_CONVENTION}"
    )
    return flops, formula


# -------------------------------------------------------------------------------- the machine


def matmul_flops(size):
    """FLOPs of a [size, size] x [size, size] matrix product: 2 per multiply-add."""
    return 2 * size**3


def matmul_parallel_products():
    """Independent products that the process's thread pools need to fill every core.

    With TensorFlow's default pools one product uses every core. With a smaller intra-op pool
    (e.g. `--intra_op_threads=1`, under which `map` runs tasks side by side) one product uses
    only that many threads, so cores / intra-op threads products run at once on the inter-op
    pool, as the train step's tasks do; the rate is then still the machine's.
    """
    import tensorflow as tf

    intra = tf.config.threading.get_intra_op_parallelism_threads()
    cores = os.cpu_count() or 1
    return max(1, cores // intra) if intra else 1


def matmul_seconds(size=2048, repeats=10, warmup=2, products=1):
    """Seconds per round of `products` dense float32 [size, size] x [size, size] products.

    The products run inside one `tf.function` (as the train step does); their sum is fetched
    so that every call has finished before the clock stops.

    Args:
      size: matrix side.
      repeats: timed rounds.
      warmup: untimed rounds first (tracing, thread pools, memory).
      products: independent products per round (see `matmul_parallel_products`).

    Returns:
      list of `repeats` floats.
    """
    import tensorflow as tf

    a = [tf.random.stateless_normal([size, size], seed=[1, i]) for i in range(products)]
    b = tf.random.stateless_normal([size, size], seed=[3, 4])

    @tf.function
    def product_sum(a, b):
        return tf.add_n([tf.reduce_sum(tf.linalg.matmul(x, b)) for x in a])

    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        product_sum(a, b).numpy()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def matmul_gflops(size=2048, repeats=10, warmup=2, products=1):
    """Median rate of dense float32 matrix products (see `matmul_seconds`), in GFLOP/s."""
    seconds = matmul_seconds(size, repeats, warmup, products)
    return products * matmul_flops(size) / float(np.median(seconds)) / 1e9


def current_rss_mib():
    """Resident set size of this process now, in MiB (psutil)."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mib():
    """Peak resident set size of this process so far (`getrusage` `ru_maxrss`), in MiB."""
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return maxrss / (2**20 if sys.platform == "darwin" else 2**10)


# ----------------------------------------------------------------------------------- one run


def random_episodes(config, seed=0):
    """A meta-batch of random tasks with the configuration's shapes, as numpy arrays.

    Images are uniform in [0, 1); labels are class-major (0,..,0, 1,..,1, ..), int32, as the
    episode sampler makes them. Sinusoid tasks are y = A sin(x − φ) with A in [0.1, 5],
    φ in [0, π], x in [−5, 5], as in the paper.

    Returns:
      dict with `support_x`, `support_y`, `query_x`, `query_y`, leading dimension B.
    """
    rng = np.random.default_rng(seed)
    b = config.meta_batch_size
    if config.classification:

        def images(per_class):
            shape = (b, config.n_way * per_class, *config.image_shape)
            return rng.uniform(size=shape).astype(np.float32)

        def labels(per_class):
            task = np.repeat(np.arange(config.n_way, dtype=np.int32), per_class)
            return np.tile(task, (b, 1))

        return {
            "support_x": images(config.k_shot),
            "support_y": labels(config.k_shot),
            "query_x": images(config.n_query),
            "query_y": labels(config.n_query),
        }
    amplitude = rng.uniform(0.1, 5.0, size=(b, 1, 1))
    phase = rng.uniform(0.0, np.pi, size=(b, 1, 1))

    def points(n):
        x = rng.uniform(-5.0, 5.0, size=(b, n, 1))
        return x.astype(np.float32), (amplitude * np.sin(x - phase)).astype(np.float32)

    support_x, support_y = points(config.k_shot)
    query_x, query_y = points(config.n_query)
    return {"support_x": support_x, "support_y": support_y, "query_x": query_x, "query_y": query_y}


def build_learner(config):
    """The configuration's learner: `learners.conv4` or `learners.mlp` (1-40-40-1).

    Built as `training.build_learner` builds it for the same settings; that one takes a resolved
    `Config`, not a `BenchConfig`, and a test checks that the two build the same P4 network.
    """
    from maml_tf import learners

    if config.classification:
        return learners.conv4(
            config.n_way,
            image_shape=config.image_shape,
            variant=config.conv_variant,
            filters=config.filters,
            paper_network=config.paper_network,
        )
    return learners.mlp()


def _percentiles(times_ms):
    values = np.asarray(times_ms, dtype=np.float64)
    p10, p25, p50, p75, p90 = np.percentile(values, [10, 25, 50, 75, 90])
    return {
        "step_ms_median": p50,
        "step_ms_p10": p10,
        "step_ms_p25": p25,
        "step_ms_p75": p75,
        "step_ms_p90": p90,
        "step_ms_min": values.min(),
        "step_ms_max": values.max(),
    }


def run_config(config, task_loop, steps=20, warmup=3, seed=0, matmul_size=2048, matmul_repeats=10):
    """Times the compiled Keras train function of one configuration in this process.

    Call `maml_tf.training.set_threads` first if the thread pools should differ from
    TensorFlow's default. The peak RSS is the whole process's, so it means "this configuration"
    only in a fresh process (which is how `python -m maml_tf.bench` runs each one).

    Args:
      config: a `BenchConfig`.
      task_loop: `MAML`'s `task_loop` argument.
      steps: timed meta-steps.
      warmup: meta-steps after the first call and before the timed ones.
      seed: seeds the weights and the random data.
      matmul_size: side of the matrices for the machine's matmul rate.
      matmul_repeats: timed matrix products.

    Returns:
      dict, the JSON record described in the module docstring.
    """
    import keras
    import tensorflow as tf

    from maml_tf import learners, training
    from maml_tf.maml import MAML

    load_before = os.getloadavg()[0]
    # The rate is measured before and after the steps, because the load of other jobs on the
    # machine changes over minutes; the peak is the median over both.
    products = matmul_parallel_products()
    matmul_before = matmul_seconds(matmul_size, matmul_repeats, products=products)
    keras.utils.set_random_seed(seed)
    rss_before_model = peak_rss_mib()
    learner = build_learner(config)
    model = MAML(
        learner,
        inner_lr=config.inner_lr,
        inner_steps=config.inner_steps,
        first_order=config.first_order,
        loss=config.loss,
        task_loop=task_loop,
        outer_only=learners.outer_only(learner, config.paper_network),
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-3))

    # The step is traced once per input signature; counting Python calls of train_step counts
    # traces, so a retracing step shows up as traces > 1.
    traces = []
    train_step = model.train_step

    def counted_train_step(data):
        traces.append(1)
        return train_step(data)

    model.train_step = counted_train_step

    # As in `fit`: the dataset goes through the distribution strategy, the iterator is passed to
    # the train function, whose tf.function takes one element per call.
    dataset = tf.data.Dataset.from_tensors(random_episodes(config, seed)).repeat()
    iterator = iter(model.distribute_strategy.experimental_distribute_dataset(dataset))
    model.make_train_function()
    train_function = model.train_function

    def one_step():
        start = time.perf_counter()
        logs = train_function(iterator)
        # Fetching a value waits for the step, as the progress bar in `fit` does.
        loss = float(logs["query_loss"])
        return time.perf_counter() - start, loss

    first_call_s, _ = one_step()
    logging.info(
        "%s/%s: first call (tracing + one step) %.1f s", config.name, task_loop, first_call_s
    )
    warmup_ms = [1e3 * one_step()[0] for _ in range(warmup)]
    # Resident memory now and after the timed steps: a leak or retracing shows as growth over
    # a long run (--steps=2000).
    rss_start = current_rss_mib()
    # Ten samples along the way tell a plateau (allocator warm-up) from a steady leak.
    sample_every = max(1, steps // 10)
    rss_by_step = {}
    step_ms, loss = [], None
    for step in range(1, steps + 1):
        seconds, loss = one_step()
        step_ms.append(1e3 * seconds)
        if step % sample_every == 0:
            rss_by_step[step] = current_rss_mib()
    rss_end = current_rss_mib()
    rss_peak = peak_rss_mib()
    load_after = os.getloadavg()[0]
    stats = _percentiles(step_ms)
    logging.info("%s/%s: median %.1f ms/step", config.name, task_loop, stats["step_ms_median"])

    flops, formula = meta_step_flops(config, learner)
    matmul_after = matmul_seconds(matmul_size, matmul_repeats, products=products)

    def gflops(seconds):
        return products * matmul_flops(matmul_size) / float(np.median(seconds)) / 1e9

    peak_gflops = gflops(matmul_before + matmul_after)
    achieved_gflops = flops / (stats["step_ms_median"] / 1e3) / 1e9
    record = {
        "config": config.name,
        "task_loop": task_loop,
        # What MAML made of it ("auto" picks another loop in the constructor).
        "task_loop_resolved": model.task_loop,
        "order": config.order,
        "description": config.description,
        "learner": learner.name,
        "paper_network": config.paper_network,
        # Positions in learner.trainable_variables that the inner loop leaves alone.
        "outer_only": sorted(model.outer_only),
        "meta_batch_size": config.meta_batch_size,
        "inner_steps": config.inner_steps,
        "inner_lr": config.inner_lr,
        "support_per_task": config.support_size,
        "query_per_task": config.query_size,
        "loss": config.loss,
        "optimizer": "Adam(1e-3)",
        "jit_compile": bool(model.jit_compile),
        "steps": steps,
        "warmup": warmup,
        "first_call_s": first_call_s,
        "trace_s_estimate": first_call_s - stats["step_ms_median"] / 1e3,
        "traces": len(traces),
        "warmup_ms": warmup_ms,
        **stats,
        "step_ms_all": step_ms,
        "last_query_loss": loss,
        "peak_rss_mib": rss_peak,
        "peak_rss_before_model_mib": rss_before_model,
        "peak_rss_method": "resource.getrusage(RUSAGE_SELF).ru_maxrss of the whole process",
        "rss_after_warmup_mib": rss_start,
        "rss_after_steps_mib": rss_end,
        "rss_mib_by_step": rss_by_step,
        "flops_per_step": flops,
        "forward_flops_per_example": forward_flops(learner, 1),
        "flops_formula": formula,
        "matmul_gflops": peak_gflops,
        "matmul_gflops_before": gflops(matmul_before),
        "matmul_gflops_after": gflops(matmul_after),
        "matmul_size": matmul_size,
        "matmul_parallel_products": products,
        "achieved_gflops": achieved_gflops,
        "fraction_of_matmul_peak": achieved_gflops / peak_gflops,
        "onednn": training.onednn(),
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_1m_before": load_before,
        "loadavg_1m_after": load_after,
        "seed": seed,
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "tf_version": tf.__version__,
        "keras_version": keras.__version__,
        "python_version": platform.python_version(),
    }
    return {k: _rounded(v) for k, v in record.items()}


def _rounded(value):
    # Four significant digits are far below the run-to-run noise and keep the lines readable.
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


# ---------------------------------------------------------------------- one process per run


def _package_root():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_in_subprocess(name, task_loop, onednn="default", timeout=None, **child_flags):
    """Runs one configuration in a fresh `python -m maml_tf.bench` process.

    Args:
      name: configuration name.
      task_loop: `MAML`'s `task_loop`.
      onednn: a key of `ONEDNN_ENV`: the child's `TF_ENABLE_ONEDNN_OPTS`, which TensorFlow
        reads only as it loads, hence one process per setting.
      timeout: seconds before the child is killed (None: no limit).
      **child_flags: values for the flags in `_CHILD_FLAGS`.

    Returns:
      The child's JSON record, or a record with an `error` field if it failed; either with
      `onednn_requested`.
    """
    return {
        **_run_child(name, task_loop, onednn, timeout, child_flags),
        "onednn_requested": onednn,
    }


def _run_child(name, task_loop, onednn, timeout, child_flags):
    command = [
        sys.executable,
        # A native crash inside TensorFlow then also prints the Python stack of every thread.
        "-X",
        "faulthandler",
        "-m",
        "maml_tf.bench",
        f"--config={name}",
        f"--task_loop={task_loop}",
        *(f"--{flag}={value}" for flag, value in child_flags.items()),
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_package_root(), env.get("PYTHONPATH")]))
    # TensorFlow's C++ start-up chatter would bury the child's own error message.
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if ONEDNN_ENV[onednn] is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = ONEDNN_ENV[onednn]
    start = time.perf_counter()
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"config": name, "task_loop": task_loop, "error": f"timed out after {timeout} s"}
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        return failure_record(name, task_loop, result)
    record = json.loads(lines[-1])
    record["process_s"] = _rounded(time.perf_counter() - start)
    return record


def failure_record(name, task_loop, result):
    """The record of a child process that failed, and its stderr logged.

    Args:
      name: configuration name.
      task_loop: `MAML`'s `task_loop`.
      result: the child's `subprocess.CompletedProcess`, stderr captured as text.

    Returns:
      `{"config", "task_loop", "error"}`: the child's last stderr line, or "killed by SIGSEGV"
      (say) if a signal ended it.
    """
    if result.returncode < 0:
        # A crash in native code: its last lines are TensorFlow's or faulthandler's, and the
        # Python stack that says which call crashed comes before them, so all of it is kept.
        try:
            signame = signal.Signals(-result.returncode).name
        except ValueError:
            signame = f"signal {-result.returncode}"
        logging.error(
            "%s/%s was killed by %s; its stderr:\n%s", name, task_loop, signame, result.stderr
        )
        return {"config": name, "task_loop": task_loop, "error": f"killed by {signame}"}
    tail = result.stderr.strip().splitlines()[-20:]
    logging.error("%s/%s failed:\n%s", name, task_loop, "\n".join(tail))
    return {
        "config": name,
        "task_loop": task_loop,
        "error": tail[-1] if tail else f"exit status {result.returncode}",
    }


def write_record(record, output=None):
    """Prints `record` as one JSON line on stdout and appends it to `output` if given."""
    line = json.dumps(record)
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
    if output:
        with open(output, "a") as f:
            f.write(line + "\n")


def run_all(
    config_names, task_loops, onednn=("default",), output=None, timeout=None, **child_flags
):
    """Runs every (configuration, task_loop, oneDNN setting), each in its own process.

    Prints each record's line as it comes.

    Args:
      config_names: configuration names (see `config_by_name`).
      task_loops: `MAML` `task_loop` values.
      onednn: keys of `ONEDNN_ENV`.
      output: file to append the JSON lines to, or None.
      timeout: seconds per configuration, or None.
      **child_flags: `steps`, `warmup`, `seed`, `inter_op_threads`, `intra_op_threads`,
        `matmul_size`, `matmul_repeats`.

    Returns:
      The records, in order; failed runs have an `error` field.
    """
    records = []
    for name in config_names:
        config_by_name(name)  # Fail on a typo before spending minutes on the others.
    for name in config_names:
        for task_loop in task_loops:
            for setting in onednn:
                logging.info("running %s with task_loop=%s, --onednn=%s", name, task_loop, setting)
                record = run_in_subprocess(
                    name, task_loop, onednn=setting, timeout=timeout, **child_flags
                )
                if "error" not in record:
                    logging.info(
                        "%s/%s, oneDNN %s: median %.1f ms/step, first call %.1f s, peak RSS "
                        "%.0f MiB, %.3g GFLOP/s = %.1f%% of matmul",
                        name,
                        task_loop,
                        ONEDNN_NAMES[record["onednn"]],
                        record["step_ms_median"],
                        record["first_call_s"],
                        record["peak_rss_mib"],
                        record["achieved_gflops"],
                        100 * record["fraction_of_matmul_peak"],
                    )
                write_record(record, output)
                records.append(record)
    return records


# ------------------------------------------------------------------------ command line


def define_flags(flag_values=flags.FLAGS):
    """Defines the benchmark's flags on `flag_values` (absl's global FLAGS by default)."""
    flags.DEFINE_list(
        "configs",
        None,
        f"Configurations to run: {', '.join(CONFIGS)}, or X{FIRST_ORDER_SUFFIX} for the first-"
        "order variant of any X. Default: all, as selected by --first_order.",
        flag_values=flag_values,
    )
    flags.DEFINE_list(
        "task_loops",
        None,
        "MAML task_loop values to run each configuration with. Default: every value in "
        "maml_tf.maml.TASK_LOOPS.",
        flag_values=flag_values,
    )
    flags.DEFINE_enum(
        "first_order",
        "configured",
        list(FIRST_ORDER_CHOICES),
        "First-order variants when --configs is not given: configured (P1-FO only), all (an "
        "-FO variant of every configuration) or none.",
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "steps", 20, "Timed meta-steps per configuration.", lower_bound=1, flag_values=flag_values
    )
    flags.DEFINE_integer(
        "warmup",
        3,
        "Untimed meta-steps after the first call (which is timed on its own).",
        lower_bound=0,
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "seed", 0, "Seeds the weights and the random data.", flag_values=flag_values
    )
    flags.DEFINE_integer(
        "inter_op_threads",
        0,
        "tf.config.threading inter-op threads (0: TensorFlow's default).",
        lower_bound=0,
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "intra_op_threads",
        0,
        "tf.config.threading intra-op threads (0: TensorFlow's default).",
        lower_bound=0,
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "matmul_size",
        2048,
        "Side of the float32 matrices whose product measures the machine's rate.",
        lower_bound=1,
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "matmul_repeats", 10, "Timed matrix products.", lower_bound=1, flag_values=flag_values
    )
    flags.DEFINE_list(
        "onednn",
        ["default"],
        "Settings of TensorFlow's oneDNN kernels to run each configuration with, each in its "
        "own process: default (TensorFlow's choice: on with AVX-512, off without, unless "
        "TF_ENABLE_ONEDNN_OPTS says otherwise), on, off; e.g. on,off to compare them.",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "output",
        None,
        "File to append the JSON lines to (they go to stdout too).",
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "timeout",
        0,
        "Seconds before a configuration's process is killed (0: no limit).",
        lower_bound=0,
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "config",
        None,
        "Internal: run this one configuration in this process (the parent passes it).",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "task_loop", None, "Internal: the task_loop for --config.", flag_values=flag_values
    )


def main(argv, flag_values=flags.FLAGS):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    f = flag_values
    child_flags = {name: f[name].value for name in _CHILD_FLAGS}
    if f.config:
        try:
            config = config_by_name(f.config)
        except ValueError as error:
            raise app.UsageError(str(error)) from error
        if not f.task_loop:
            raise app.UsageError("--config needs --task_loop")
        from maml_tf import training

        try:
            training.set_threads(f.inter_op_threads, f.intra_op_threads)
        except UserError as error:
            raise app.UsageError(str(error)) from error
        record = run_config(
            config,
            f.task_loop,
            steps=f.steps,
            warmup=f.warmup,
            seed=f.seed,
            matmul_size=f.matmul_size,
            matmul_repeats=f.matmul_repeats,
        )
        write_record(record, f.output)
        return

    names = f.configs or default_config_names(f.first_order)
    for name in names:
        try:
            config_by_name(name)
        except ValueError as error:
            raise app.UsageError(str(error)) from error
    task_loops = f.task_loops or default_task_loops()
    for setting in f.onednn:
        if setting not in ONEDNN_ENV:
            raise app.UsageError(
                f"--onednn={','.join(f.onednn)}: {setting!r} is not one of {', '.join(ONEDNN_ENV)}"
            )
    start = time.perf_counter()
    records = run_all(
        names,
        task_loops,
        onednn=f.onednn,
        output=f.output,
        timeout=f.timeout or None,
        **child_flags,
    )
    logging.info("benchmark took %.0f s", time.perf_counter() - start)
    if any("error" in r for r in records):
        sys.exit(1)


def run():
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
