"""Sinusoid regression tasks, the paper's first experiment, as a seeded `tf.data` pipeline.

A task is y = A·sin(x − φ) with amplitude A ~ U[0.1, 5], phase φ ~ U[0, π] and inputs
x ~ U[−5, 5] (Finn et al. 2017, section 5.1). Every task is drawn with stateless random ops from
a seed that the pipeline derives from its element, so a pipeline is fully determined by its seed
and no Python generator runs on the hot path.
"""

import math

import tensorflow as tf

AMPLITUDE_RANGE = (0.1, 5.0)
PHASE_RANGE = (0.0, math.pi)
INPUT_RANGE = (-5.0, 5.0)


def sample_task(seed, k_shot, n_query):
    """Draws one sinusoid task.

    Args:
      seed: int32/int64 [2], the stateless seed of this task.
      k_shot: K, support points.
      n_query: query points.

    Returns:
      Dict of float32 tensors: `support_x`, `support_y` [k_shot, 1], `query_x`, `query_y`
      [n_query, 1], `amplitude` and `phase` [] (the task's parameters, for plots).
    """
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=3)
    amplitude = tf.random.stateless_uniform([], seeds[0], *AMPLITUDE_RANGE)
    phase = tf.random.stateless_uniform([], seeds[1], *PHASE_RANGE)
    x = tf.random.stateless_uniform([k_shot + n_query, 1], seeds[2], *INPUT_RANGE)
    y = amplitude * tf.sin(x - phase)
    return {
        "support_x": x[:k_shot],
        "support_y": y[:k_shot],
        "query_x": x[k_shot:],
        "query_y": y[k_shot:],
        "amplitude": amplitude,
        "phase": phase,
    }


SPLITS = ("train", "val", "test")


def task_seed(seed, split, index):
    """The stateless seed of task `index` of `split`: a fixed function of (seed, split, index)."""
    base = tf.stack([tf.cast(seed, tf.int64), tf.constant(SPLITS.index(split), tf.int64)])
    return tf.random.experimental.stateless_fold_in(base, tf.cast(index, tf.int64))


def task_dataset(
    k_shot,
    n_query,
    meta_batch_size,
    seed,
    split="train",
    num_tasks=None,
    drop_remainder=True,
    first_task=0,
):
    """Meta-batches of sinusoid tasks.

    Task i of a split depends only on (seed, split, i): the training stream, the validation
    tasks and the test tasks never share a task, and the same arguments give the same tasks
    whatever the parallelism or batch size.

    Args:
      k_shot: K, support points per task.
      n_query: query points per task.
      meta_batch_size: B, tasks per element.
      seed: the pipeline's seed.
      split: "train", "val" or "test".
      num_tasks: None for an endless stream (training); a number for a fixed set of tasks
        (validation, test).
      drop_remainder: drop a last, smaller meta-batch (keep it True for training, so the
        meta-batch size is static).
      first_task: index of the first task of an endless stream: a run resumed after
        `first_task / meta_batch_size` meta-updates draws the tasks an uninterrupted run would.

    Returns:
      A `tf.data.Dataset` of dicts as `sample_task` returns them, with a leading [B] dimension.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if num_tasks is None:
        indices = tf.data.Dataset.counter(start=first_task)
    elif first_task:
        raise ValueError("first_task is for endless streams (num_tasks=None)")
    else:
        indices = tf.data.Dataset.range(num_tasks)
    tasks = indices.map(
        lambda i: sample_task(task_seed(seed, split, i), k_shot, n_query),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    return tasks.batch(meta_batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)


def curve(amplitude, phase, num_points=200):
    """The true function of a task on a grid over the input range, for plots.

    Returns:
      (x, y): float32 [num_points, 1] each.
    """
    x = tf.linspace(*INPUT_RANGE, num_points)[:, None]
    return x, amplitude * tf.sin(x - phase)
