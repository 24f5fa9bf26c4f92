"""Builds the train, validation and test episode pipelines that a `Config` asks for."""

import collections

from absl import logging

from maml_tf.data import episodes, folder, omniglot, sinusoid
from maml_tf.errors import UserError

Datasets = collections.namedtuple("Datasets", ["train", "val", "test", "protocol", "train_from"])
Datasets.__doc__ = """Episode pipelines of one run.

Attributes:
  train: endless `tf.data.Dataset` of meta-batches (static meta-batch size).
  train_from: `train_from(step)`, the same stream from meta-batch `step` on (what a run
    resumed after `step` meta-updates consumes next).
  val: the fixed validation tasks, finite.
  test: the fixed meta-test tasks, finite.
  protocol: dict describing the data side of the protocol (split, class counts, query size),
    written next to the results.
"""


def _datasets(config, tasks, protocol):
    """The endless training stream and the fixed validation and test tasks.

    Args:
      config: the resolved `Config`.
      tasks: `tasks(split, seed, num_tasks, drop_remainder, first_task) -> tf.data.Dataset`.
      protocol: see `Datasets`.
    """

    def train_from(step):
        return tasks("train", config.seed, None, True, step * config.meta_batch_size)

    return Datasets(
        train=train_from(0),
        val=tasks("val", config.eval_seed, config.val_tasks, False, 0),
        test=tasks("test", config.eval_seed, config.test_tasks, False, 0),
        protocol=protocol,
        train_from=train_from,
    )


def _sinusoid(config):
    def tasks(split, seed, num_tasks, drop_remainder, first_task):
        return sinusoid.task_dataset(
            config.k_shot,
            config.n_query,
            config.meta_batch_size,
            seed,
            split=split,
            num_tasks=num_tasks,
            drop_remainder=drop_remainder,
            first_task=first_task,
        )

    protocol = {"k_shot": config.k_shot, "n_query": config.n_query}
    return _datasets(config, tasks, protocol)


def load_splits(config):
    """The meta-train/validation/test classes of an image data set (`episodes.Splits`)."""
    if config.dataset == "omniglot":
        if config.data_dir:
            data = omniglot.load_omniglot(
                config.data_dir,
                config.cache_dir,
                image_size=config.image_size,
                resample=config.resample,
            )
        else:
            logging.info("no --data_dir: loading Omniglot through TFDS")
            data = omniglot.load_omniglot_tfds(
                image_size=config.image_size, resample=config.resample
            )
        return omniglot.omniglot_splits(data, config.split, rotation=config.rotation)
    if not config.data_dir:
        raise UserError("--dataset=folder needs --data_dir=DIR with DIR/{train,val,test}/<class>/")
    return folder.load_image_folder(config.data_dir, config.image_size, channels=3)


def _images(config):
    splits = load_splits(config)
    episodes.check_episode_shape(splits, config.n_way, config.k_shot, config.n_query)

    def tasks(split_name, seed, num_tasks, drop_remainder, first_task):
        split = getattr(splits, split_name)
        return episodes.episode_dataset(
            split.images,
            config.n_way,
            config.k_shot,
            config.n_query,
            config.meta_batch_size,
            seed,
            num_tasks=num_tasks,
            drop_remainder=drop_remainder,
            counts=split.counts,
            split_name=split_name,
            first_task=first_task,
            rotations=split.episode_rotations,
        )

    protocol = {
        "split": config.split if config.dataset == "omniglot" else "folder train/val/test",
        "classes": {name: int(getattr(splits, name).images.shape[0]) for name in splits._fields},
        "n_way": config.n_way,
        "k_shot": config.k_shot,
        "n_query": config.n_query,
        "image_size": config.image_size,
    }
    if config.dataset == "omniglot":
        protocol["resample"] = config.resample
        protocol["rotation"] = config.rotation
        protocol["episode_rotations"] = list(splits.test.episode_rotations)
    return _datasets(config, tasks, protocol)


def build_datasets(config):
    """The episode pipelines for a resolved `Config`.

    Args:
      config: a resolved `maml_tf.config.Config`.

    Returns:
      `Datasets`.

    Raises:
      UserError: the data cannot be found or read, or is too small for the episodes asked for.
    """
    if config.dataset == "sinusoid":
        return _sinusoid(config)
    return _images(config)
