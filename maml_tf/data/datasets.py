"""Builds the train, validation and test episode pipelines that a `Config` asks for."""

import collections

from maml_tf.data import sinusoid

Datasets = collections.namedtuple("Datasets", ["train", "val", "test"])
Datasets.__doc__ = """Episode pipelines of one run.

Attributes:
  train: endless `tf.data.Dataset` of meta-batches (static meta-batch size).
  val: the fixed validation tasks, finite.
  test: the fixed meta-test tasks, finite.
"""


def build_datasets(config):
    """The episode pipelines for a resolved `Config`.

    Args:
      config: a resolved `maml_tf.config.Config`.

    Returns:
      `Datasets`.
    """
    if config.dataset == "sinusoid":

        def tasks(split, seed, num_tasks, drop_remainder):
            return sinusoid.task_dataset(
                config.k_shot,
                config.n_query,
                config.meta_batch_size,
                seed,
                split=split,
                num_tasks=num_tasks,
                drop_remainder=drop_remainder,
            )

        return Datasets(
            train=tasks("train", config.seed, None, True),
            val=tasks("val", config.eval_seed, config.val_tasks, False),
            test=tasks("test", config.eval_seed, config.test_tasks, False),
        )
    raise NotImplementedError(f"dataset {config.dataset!r}")
