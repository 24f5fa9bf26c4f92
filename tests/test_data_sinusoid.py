"""Invariants of the sinusoid task pipeline, one per test."""

import math

import numpy as np

from maml_tf.data import sinusoid


def first_batch(**kwargs):
    args = {"k_shot": 10, "n_query": 7, "meta_batch_size": 25, "seed": 0}
    args.update(kwargs)
    return {k: v.numpy() for k, v in next(iter(sinusoid.task_dataset(**args))).items()}


def test_shapes_and_dtypes():
    batch = first_batch()
    assert batch["support_x"].shape == (25, 10, 1) and batch["support_y"].shape == (25, 10, 1)
    assert batch["query_x"].shape == (25, 7, 1) and batch["query_y"].shape == (25, 7, 1)
    assert all(v.dtype == np.float32 for v in batch.values())


def test_parameters_and_inputs_lie_in_the_papers_ranges():
    batch = first_batch(meta_batch_size=500)
    assert batch["amplitude"].min() >= 0.1 and batch["amplitude"].max() <= 5.0
    assert batch["phase"].min() >= 0.0 and batch["phase"].max() <= math.pi
    for key in ("support_x", "query_x"):
        assert batch[key].min() >= -5.0 and batch[key].max() <= 5.0


def test_targets_are_the_tasks_sinusoid():
    batch = first_batch()
    a, p = batch["amplitude"][:, None, None], batch["phase"][:, None, None]
    np.testing.assert_allclose(batch["support_y"], a * np.sin(batch["support_x"] - p), atol=1e-5)
    np.testing.assert_allclose(batch["query_y"], a * np.sin(batch["query_x"] - p), atol=1e-5)


def test_tasks_within_a_batch_differ():
    assert len(np.unique(first_batch()["amplitude"])) == 25


def test_same_seed_gives_the_same_tasks():
    a, b = first_batch(seed=3), first_batch(seed=3)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_different_seeds_give_different_tasks():
    assert not np.array_equal(first_batch(seed=3)["support_x"], first_batch(seed=4)["support_x"])


def test_splits_never_share_a_task():
    amplitudes = {
        split: first_batch(split=split, num_tasks=25, meta_batch_size=25)["amplitude"]
        for split in sinusoid.SPLITS
    }
    assert not set(amplitudes["train"]) & set(amplitudes["val"])
    assert not set(amplitudes["val"]) & set(amplitudes["test"])
    assert not set(amplitudes["train"]) & set(amplitudes["test"])


def test_fixed_tasks_do_not_depend_on_batch_size():
    def amplitudes(batch_size):
        dataset = sinusoid.task_dataset(
            5, 5, batch_size, seed=1, split="test", num_tasks=20, drop_remainder=False
        )
        return np.concatenate([b["amplitude"].numpy() for b in dataset])

    np.testing.assert_array_equal(amplitudes(3), amplitudes(20))
    assert len(amplitudes(3)) == 20


def test_training_stream_batches_are_static():
    dataset = sinusoid.task_dataset(5, 5, 4, seed=0)
    assert dataset.element_spec["support_x"].shape == (4, 5, 1)


def test_a_stream_started_at_a_later_task_continues_the_full_one():
    full = sinusoid.task_dataset(5, 5, 4, seed=3).skip(3)
    resumed = sinusoid.task_dataset(5, 5, 4, seed=3, first_task=12)
    for a, b in zip(full.take(2), resumed.take(2), strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())
