"""N-way K-shot episodes drawn from an in-memory image array as a `tf.data` pipeline.

A reader (`omniglot.py`, `folder.py`) turns files into a `Split`: every class's examples as one
dense uint8 array. This module knows what an episode is and nothing about files.

Each episode is a pure function of a 2-element stateless seed, and the seed of episode i is
derived from `(seed, i)` alone, so the episodes do not depend on parallelism, batch size,
`tf.random.set_seed` or how many episodes were drawn before.
"""

from typing import NamedTuple

import numpy as np
import tensorflow as tf

from maml_tf.errors import UserError

# Separate seed streams so that a training stream and a fixed-task set built with the same
# seed (for example tasks on the training classes, to monitor overfitting) do not coincide.
_TRAIN_STREAM = 0
_FIXED_STREAM = 1


class Split(NamedTuple):
    """The classes of one meta-split, densely packed for the sampler.

    Attributes:
        images: uint8 `[classes, max_per_class, H, W, C]`. Class `c` owns the first `counts[c]`
            rows of `images[c]`; the rest is zero padding that the sampler never draws.
        counts: int32 `[classes]`, examples per class (all equal for Omniglot).
        names: one name per class, e.g. `"Latin/character01"` or `"n01532829"`.
        episode_rotations: angles in degrees (multiples of 90) by which an episode turns its
            classes, one drawn uniformly per class and episode (the MAML paper's code on
            Omniglot); `(0,)` turns nothing.
    """

    images: np.ndarray
    counts: np.ndarray
    names: tuple[str, ...]
    episode_rotations: tuple[int, ...] = (0,)


class Splits(NamedTuple):
    """Meta-train, meta-validation and meta-test classes; no class is in two of them."""

    train: Split
    val: Split
    test: Split


def make_split(
    images: np.ndarray, names, counts: np.ndarray | None = None, episode_rotations=(0,)
) -> Split:
    """Builds a `Split`, with full counts when `counts` is None.

    Args:
        images: uint8 `[classes, per_class, H, W, C]`.
        names: `classes` class names.
        counts: optional int32 `[classes]`; None means every class has `per_class` examples.
        episode_rotations: see `Split`.

    Returns:
        The `Split`.

    Raises:
        ValueError: `episode_rotations` are not distinct multiples of 90 degrees, or not square
            images when they turn anything.
    """
    images = np.asarray(images)
    if counts is None:
        counts = np.full([images.shape[0]], images.shape[1], np.int32)
    episode_rotations = check_rotations(episode_rotations, images.shape)
    return Split(images, np.asarray(counts, np.int32), tuple(names), episode_rotations)


def check_rotations(rotations, images_shape=None) -> tuple[int, ...]:
    """`rotations` as a tuple of ints after checking they are distinct multiples of 90 degrees.

    Args:
        rotations: angles in degrees.
        images_shape: `[classes, per_class, H, W, C]` of the images they will turn, or None.

    Raises:
        ValueError: empty, not multiples of 90, two angles that are the same turn, or a turn
            of images that are not square.
    """
    rotations = tuple(int(angle) for angle in rotations)
    distinct = {angle % 360 for angle in rotations}
    if not rotations or any(angle % 90 for angle in rotations) or len(distinct) < len(rotations):
        raise ValueError(f"rotations must be distinct multiples of 90 degrees, got {rotations}")
    turns = any(angle % 360 for angle in rotations)
    if turns and images_shape is not None and images_shape[2] != images_shape[3]:
        raise ValueError(f"episode rotations need square images, got {tuple(images_shape[2:4])}")
    return rotations


def check_episode_shape(splits: Splits, n_way: int, k_shot: int, n_query: int) -> None:
    """Checks that every split can supply N-way episodes of k_shot + n_query examples per class.

    Args:
        splits: the meta-splits.
        n_way: classes per episode (`--n_way`).
        k_shot: support examples per class (`--k_shot`).
        n_query: query examples per class (`--n_query`).

    Raises:
        UserError: naming the flag and the split when a split has fewer than `n_way` classes or
            a class has fewer than `k_shot + n_query` examples.
    """
    for split_name, split in zip(Splits._fields, splits, strict=True):
        _check_episode_shape(
            split.images.shape[0], split.counts, n_way, k_shot, n_query, split_name, split.names
        )


def _check_episode_shape(num_classes, counts, n_way, k_shot, n_query, split_name, names=None):
    """Raises UserError when episodes of this shape cannot be drawn; see `check_episode_shape`."""
    for flag, value, lowest in (
        ("n_way", n_way, 1),
        ("k_shot", k_shot, 1),
        ("n_query", n_query, 1),
    ):
        if value < lowest:
            raise UserError(f"--{flag}={value} must be at least {lowest}")
    if n_way > num_classes:
        raise UserError(
            f"--n_way={n_way} is more than the {num_classes} classes of the {split_name} split"
        )
    counts = np.asarray(counts)
    if counts.size and counts.min() < k_shot + n_query:
        smallest = int(counts.argmin())
        label = repr(names[smallest]) if names is not None else f"index {smallest}"
        raise UserError(
            f"--k_shot={k_shot} + --n_query={n_query} needs {k_shot + n_query} examples per "
            f"class, but class {label} of the {split_name} split has only {counts[smallest]}"
        )


def _pixel_orders(example_shape, rotations):
    """int32 `[len(rotations), H*W]`: where each pixel of an image turned by each angle comes from.

    Turning is a fixed permutation of the pixels, so a class turns with one gather whatever its
    angle; `tf.image.rot90` takes one angle for a whole batch and would have to turn every class
    by every angle.
    """
    height, width = example_shape[0], example_shape[1]
    pixels = np.arange(height * width, dtype=np.int32).reshape(height, width)
    return tf.constant(np.stack([np.rot90(pixels, angle // 90 % 4).ravel() for angle in rotations]))


def _turn_classes(x, orders):
    """`x` `[n_way, per_episode, H, W, C]` with class i's images turned by `orders[i]` `[H*W]`."""
    shape = tf.shape(x)
    flat = tf.reshape(x, [shape[0], shape[1], shape[2] * shape[3], shape[4]])
    turned = tf.gather(flat, orders, axis=2, batch_dims=1)
    return tf.reshape(turned, shape)


def sample_episode(
    images: tf.Tensor,
    seed: tf.Tensor,
    n_way: int,
    k_shot: int,
    n_query: int,
    counts: tf.Tensor | None = None,
    rotations: tuple[int, ...] = (0,),
) -> dict[str, tf.Tensor]:
    """Draws one N-way K-shot episode, a pure function of `seed`.

    The `n_way` classes are drawn without replacement and labelled 0..n_way-1 in the order they
    were drawn, which is random, so label 0 is not the lowest class index. Per class,
    `k_shot + n_query` distinct examples are drawn without replacement: the first `k_shot` form
    the support set and the rest the query set, so the two never share an example. Both sets are
    in class-major order (`support_y = [0]*k_shot + [1]*k_shot + ...`): a learner that treats
    a set as a batch (per-example losses, batch statistics) does not depend on the order, and a
    fixed order keeps episodes easy to inspect.

    With `rotations` other than `(0,)`, each class of the episode is turned by one of them,
    drawn uniformly and independently per class: all its support and query images by the same
    angle, counter-clockwise (as `tf.image.rot90`). The class and example draws are the same as
    without rotations, from the same seed.

    Args:
        images: uint8 `[classes, per_class, H, W, C]` with static H, W, C.
        seed: int32 or int64 `[2]`, the stateless seed of this episode.
        n_way: classes per episode.
        k_shot: support examples per class.
        n_query: query examples per class.
        counts: optional int32 `[classes]`, valid examples per class (the rest is padding);
            None when every class has `per_class` examples. The caller checks that every count
            is at least `k_shot + n_query`.
        rotations: angles in degrees, distinct multiples of 90 (`check_rotations`); images
            must be square when one of them turns.

    Returns:
        A dict with `support_x` float32 `[n_way*k_shot, H, W, C]` in [0, 1], `support_y` int32
        `[n_way*k_shot]`, `query_x` float32 `[n_way*n_query, H, W, C]` and `query_y` int32
        `[n_way*n_query]`.
    """
    images = tf.convert_to_tensor(images)
    example_shape = images.shape[2:]
    per_episode = k_shot + n_query
    class_seed, example_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))

    num_classes = tf.shape(images, out_type=tf.int64)[0]
    classes = tf.random.experimental.stateless_shuffle(tf.range(num_classes), class_seed)[:n_way]

    # A random key per example, sorted, picks a uniform subset without replacement. Padding gets
    # the key 2, above every real key in [0, 1), so it is never among the first k + q.
    keys = tf.random.stateless_uniform([n_way, tf.shape(images)[1]], example_seed)
    if counts is not None:
        valid = tf.range(tf.shape(images)[1])[None, :] < tf.gather(counts, classes)[:, None]
        keys = tf.where(valid, keys, 2.0)
    examples = tf.argsort(keys, axis=1, stable=True)[:, :per_episode]

    indices = tf.stack(
        [tf.broadcast_to(classes[:, None], [n_way, per_episode]), tf.cast(examples, tf.int64)],
        axis=-1,
    )
    x = tf.gather_nd(images, indices)
    if any(angle % 360 for angle in rotations):
        # Its own stream, so that adding rotations leaves the class and example draws alone.
        rotation_seed = tf.random.experimental.stateless_fold_in(seed, 2)
        choice = tf.random.stateless_uniform(
            [n_way], rotation_seed, maxval=len(rotations), dtype=tf.int32
        )
        x = _turn_classes(x, tf.gather(_pixel_orders(example_shape, rotations), choice))
    x = tf.cast(x, tf.float32) / 255.0
    y = tf.broadcast_to(tf.range(n_way, dtype=tf.int32)[:, None], [n_way, per_episode])
    return {
        "support_x": tf.reshape(x[:, :k_shot], [n_way * k_shot, *example_shape]),
        "support_y": tf.reshape(y[:, :k_shot], [n_way * k_shot]),
        "query_x": tf.reshape(x[:, k_shot:], [n_way * n_query, *example_shape]),
        "query_y": tf.reshape(y[:, k_shot:], [n_way * n_query]),
    }


def episode_dataset(
    images: np.ndarray,
    n_way: int,
    k_shot: int,
    n_query: int,
    meta_batch_size: int,
    seed: int,
    num_tasks: int | None = None,
    drop_remainder: bool = True,
    counts: np.ndarray | None = None,
    *,
    split_name: str = "given",
    first_task: int = 0,
    rotations=(0,),
) -> tf.data.Dataset:
    """Meta-batches of N-way K-shot episodes, drawn in parallel and deterministically.

    The images are held once, as one tensor captured by the map function; each element of the
    dataset is a meta-batch of `meta_batch_size` episodes from `sample_episode`. Episode i is
    drawn with a stateless seed derived from `(seed, i)` only. With `num_tasks=None` the dataset
    is infinite (training: pass `steps_per_epoch` to `fit`); with `num_tasks` it holds exactly
    those tasks, the same ones on every iteration and for every batch size (validation, test).
    Training and fixed-task datasets built with the same seed draw different episodes.

    Args:
        images: uint8 `[classes, per_class, H, W, C]`, e.g. `Split.images`.
        n_way: classes per episode (`--n_way`).
        k_shot: support examples per class (`--k_shot`).
        n_query: query examples per class (`--n_query`).
        meta_batch_size: episodes per element.
        seed: the seed of the episode stream.
        num_tasks: None for an infinite stream, else the number of fixed tasks.
        drop_remainder: drop a last, smaller meta-batch; True keeps the batch dimension static,
            which `fit` needs. With `num_tasks`, False keeps every task.
        counts: optional int32 `[classes]`, valid examples per class (`Split.counts`).
        split_name: used in error messages only.
        first_task: index of the first episode of an endless stream: a run resumed after
            `first_task / meta_batch_size` meta-updates draws the episodes an uninterrupted
            run would.
        rotations: angles (degrees) by which each class of an episode may be turned, one drawn
            per class (`Split.episode_rotations`; `sample_episode`).

    Returns:
        A `tf.data.Dataset` of dicts: `support_x` float32 `[B, n_way*k_shot, H, W, C]` in [0, 1],
        `support_y` int32 `[B, n_way*k_shot]`, `query_x` float32 `[B, n_way*n_query, H, W, C]`,
        `query_y` int32 `[B, n_way*n_query]`, B = `meta_batch_size` (static when
        `drop_remainder`).

    Raises:
        UserError: naming `--n_way`, `--k_shot` or `--n_query` when the split is too small for
            the episodes asked for.
        ValueError: when `images` is not a uint8 5-D array, `meta_batch_size` or `num_tasks`
            is below 1, or `rotations` are not distinct multiples of 90 degrees (or turn
            images that are not square).
    """
    images = np.asarray(images)
    if images.ndim != 5 or images.dtype != np.uint8:
        raise ValueError(
            f"images must be uint8 [classes, per_class, H, W, C], got {images.dtype} {images.shape}"
        )
    if meta_batch_size < 1:
        raise ValueError(f"meta_batch_size must be at least 1, got {meta_batch_size}")
    if num_tasks is not None and num_tasks < 1:
        raise ValueError(f"num_tasks must be at least 1, got {num_tasks}")
    if first_task and num_tasks is not None:
        raise ValueError("first_task is for endless streams (num_tasks=None)")
    full_counts = np.full([images.shape[0]], images.shape[1], np.int32)
    counts = full_counts if counts is None else np.asarray(counts, np.int32)
    if counts.shape != full_counts.shape or (counts > images.shape[1]).any():
        raise ValueError(f"counts {counts.shape} do not fit images {images.shape}")
    _check_episode_shape(images.shape[0], counts, n_way, k_shot, n_query, split_name)
    rotations = check_rotations(rotations, images.shape)

    images_tensor = tf.convert_to_tensor(images)
    # Masking padding costs a little per episode, so skip it when there is none.
    counts_tensor = None if (counts == full_counts).all() else tf.convert_to_tensor(counts)
    if num_tasks is None:
        stream, indices = _TRAIN_STREAM, tf.data.Dataset.counter(start=first_task)
    else:
        stream, indices = _FIXED_STREAM, tf.data.Dataset.range(num_tasks)
    base_seed = tf.constant([seed, stream], tf.int64)

    def episode(index):
        episode_seed = tf.random.experimental.stateless_fold_in(base_seed, index)
        return sample_episode(
            images_tensor, episode_seed, n_way, k_shot, n_query, counts_tensor, rotations
        )

    return (
        indices.map(episode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .batch(meta_batch_size, drop_remainder=drop_remainder)
        .prefetch(tf.data.AUTOTUNE)
    )
