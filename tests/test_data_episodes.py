"""Tests of maml_tf.data.episodes, one invariant of the sampler each.

The images encode where they come from: pixel (0, 0) is the class index and pixel (0, 1) the
example index, so an episode can be traced back to the examples it drew.
"""

import numpy as np
import pytest
import tensorflow as tf

from maml_tf.data import episodes
from maml_tf.errors import UserError

NUM_CLASSES, PER_CLASS = 12, 8
N_WAY, K_SHOT, N_QUERY = 5, 2, 3


def labelled_images(num_classes=NUM_CLASSES, per_class=PER_CLASS):
    """uint8 [classes, per_class, 2, 2, 1] with the class and example index in the pixels."""
    images = np.zeros([num_classes, per_class, 2, 2, 1], np.uint8)
    images[:, :, 0, 0, 0] = np.arange(num_classes)[:, None]
    images[:, :, 0, 1, 0] = np.arange(per_class)[None, :]
    images[:, :, 1, 1, 0] = 255
    return images


def provenance(x):
    """(class, example) index pairs of float32 [..., 2, 2, 1] images, as int [..., 2]."""
    pixels = np.round(np.asarray(x) * 255).astype(int)
    return np.stack([pixels[..., 0, 0, 0], pixels[..., 0, 1, 0]], axis=-1)


def episode(seed, images=None, counts=None, n_way=N_WAY, k_shot=K_SHOT, n_query=N_QUERY):
    images = labelled_images() if images is None else images
    result = episodes.sample_episode(
        images, tf.constant(seed, tf.int64), n_way, k_shot, n_query, counts
    )
    return {key: value.numpy() for key, value in result.items()}


def as_numpy(dataset):
    return [{key: value.numpy() for key, value in batch.items()} for batch in dataset]


def unbatched(batches):
    return {key: np.concatenate([batch[key] for batch in batches]) for key in batches[0]}


def test_episode_shapes_and_dtypes():
    result = episode([1, 2])
    assert result["support_x"].shape == (N_WAY * K_SHOT, 2, 2, 1)
    assert result["support_y"].shape == (N_WAY * K_SHOT,)
    assert result["query_x"].shape == (N_WAY * N_QUERY, 2, 2, 1)
    assert result["query_y"].shape == (N_WAY * N_QUERY,)
    assert result["support_x"].dtype == np.float32
    assert result["support_y"].dtype == np.int32


def test_images_are_scaled_to_the_unit_interval():
    result = episode([1, 2])
    assert result["query_x"].min() == 0.0
    assert result["query_x"].max() == 1.0


def test_classes_in_an_episode_are_distinct():
    for i in range(20):
        classes = provenance(episode([i, 0], n_way=NUM_CLASSES)["support_x"])[:, 0]
        assert len(set(classes)) == NUM_CLASSES


def test_each_label_is_one_class_in_support_and_query():
    result = episode([3, 4])
    for key in ("support", "query"):
        classes = provenance(result[f"{key}_x"])[:, 0]
        for label in range(N_WAY):
            assert len(set(classes[result[f"{key}_y"] == label])) == 1
    support_classes = provenance(result["support_x"])[:, 0]
    query_classes = provenance(result["query_x"])[:, 0]
    for label in range(N_WAY):
        assert set(support_classes[result["support_y"] == label]) == set(
            query_classes[result["query_y"] == label]
        )


def test_labels_are_assigned_in_shuffled_class_order():
    orders = set()
    for i in range(20):
        result = episode([i, 1])
        classes = provenance(result["support_x"])[:, 0][::K_SHOT]
        orders.add(tuple(np.argsort(classes)))
    assert len(orders) > 1


def test_support_is_class_major():
    result = episode([5, 6])
    np.testing.assert_array_equal(result["support_y"], np.repeat(np.arange(N_WAY), K_SHOT))
    np.testing.assert_array_equal(result["query_y"], np.repeat(np.arange(N_WAY), N_QUERY))


def test_support_and_query_examples_are_disjoint_within_a_class():
    for i in range(20):
        # k_shot + n_query = per_class: every example of a class is used exactly once.
        result = episode([i, 2], k_shot=3, n_query=PER_CLASS - 3)
        drawn = np.concatenate([provenance(result["support_x"]), provenance(result["query_x"])])
        assert len({tuple(pair) for pair in drawn}) == len(drawn)


def test_same_seed_gives_the_same_episode():
    first, second = episode([7, 8]), episode([7, 8])
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])


def test_different_seeds_give_different_episodes():
    assert not np.array_equal(episode([7, 8])["support_x"], episode([7, 9])["support_x"])


def test_padding_beyond_counts_is_never_drawn():
    images = labelled_images()
    counts = np.full([NUM_CLASSES], PER_CLASS, np.int32)
    counts[::2] = K_SHOT + N_QUERY
    for i in range(20):
        result = episode([i, 3], images, tf.constant(counts))
        drawn = np.concatenate([provenance(result["support_x"]), provenance(result["query_x"])])
        assert (drawn[:, 1] < counts[drawn[:, 0]]).all()


def test_training_batches_have_a_static_batch_dimension():
    dataset = episodes.episode_dataset(labelled_images(), N_WAY, K_SHOT, N_QUERY, 4, seed=0)
    assert dataset.element_spec["support_x"].shape == (4, N_WAY * K_SHOT, 2, 2, 1)
    assert dataset.element_spec["query_y"].shape == (4, N_WAY * N_QUERY)
    assert dataset.element_spec["query_y"].dtype == tf.int32


def test_training_stream_is_infinite_and_seeded():
    def first_batches(seed):
        dataset = episodes.episode_dataset(labelled_images(), N_WAY, K_SHOT, N_QUERY, 4, seed)
        assert dataset.cardinality() == tf.data.INFINITE_CARDINALITY
        return unbatched(as_numpy(dataset.take(3)))["support_x"]

    np.testing.assert_array_equal(first_batches(0), first_batches(0))
    assert not np.array_equal(first_batches(0), first_batches(1))


def test_training_stream_ignores_the_global_seed():
    def first_batch():
        dataset = episodes.episode_dataset(labelled_images(), N_WAY, K_SHOT, N_QUERY, 4, 0)
        return as_numpy(dataset.take(1))[0]["support_x"]

    try:
        tf.random.set_seed(1)
        first = first_batch()
        tf.random.set_seed(2)
        np.testing.assert_array_equal(first, first_batch())
    finally:
        tf.random.set_seed(None)


def test_fixed_tasks_are_identical_across_iterations():
    dataset = episodes.episode_dataset(
        labelled_images(), N_WAY, K_SHOT, N_QUERY, 3, seed=5, num_tasks=7, drop_remainder=False
    )
    first, second = unbatched(as_numpy(dataset)), unbatched(as_numpy(dataset))
    assert len(first["support_x"]) == 7
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])


def test_fixed_tasks_are_identical_across_batch_sizes():
    def tasks(batch_size):
        dataset = episodes.episode_dataset(
            labelled_images(),
            N_WAY,
            K_SHOT,
            N_QUERY,
            batch_size,
            seed=5,
            num_tasks=7,
            drop_remainder=False,
        )
        return unbatched(as_numpy(dataset))

    small, large = tasks(2), tasks(7)
    for key in small:
        np.testing.assert_array_equal(small[key], large[key])


def test_fixed_tasks_differ_from_the_training_stream_of_the_same_seed():
    train = episodes.episode_dataset(labelled_images(), N_WAY, K_SHOT, N_QUERY, 4, seed=5)
    fixed = episodes.episode_dataset(
        labelled_images(), N_WAY, K_SHOT, N_QUERY, 4, seed=5, num_tasks=4
    )
    assert not np.array_equal(
        as_numpy(train.take(1))[0]["support_x"], as_numpy(fixed)[0]["support_x"]
    )


def test_too_many_ways_names_the_flag():
    with pytest.raises(UserError, match=r"--n_way=13 is more than the 12 classes of the val"):
        episodes.episode_dataset(labelled_images(), 13, 1, 1, 2, 0, split_name="val")


def test_too_many_examples_per_class_names_the_flags():
    with pytest.raises(UserError, match=r"--k_shot=5 \+ --n_query=4 needs 9 examples per class"):
        episodes.episode_dataset(labelled_images(), N_WAY, 5, 4, 2, 0)


def test_small_counts_are_checked_against_the_episode_shape():
    counts = np.full([NUM_CLASSES], PER_CLASS, np.int32)
    counts[3] = 2
    with pytest.raises(UserError, match="class index 3 of the train split has only 2"):
        episodes.episode_dataset(
            labelled_images(), N_WAY, K_SHOT, N_QUERY, 2, 0, counts=counts, split_name="train"
        )


def test_a_stream_started_at_a_later_episode_continues_the_full_one():
    full = episodes.episode_dataset(labelled_images(), N_WAY, K_SHOT, N_QUERY, 4, 7).skip(2)
    resumed = episodes.episode_dataset(
        labelled_images(), N_WAY, K_SHOT, N_QUERY, 4, 7, first_task=8
    )
    for a, b in zip(full.take(2), resumed.take(2), strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())


QUARTER_TURNS = (0, 90, 180, 270)


def turns_and_provenance(x):
    """(quarter turns, class, example) of `labelled_images` images after `rot90`, as int [n, 3].

    The 255 marker sits at (1, 1) of an unturned image; where it lies tells the turn, and
    turning back recovers the provenance pixels.
    """
    pixels = np.round(np.asarray(x) * 255).astype(int)[..., 0]
    rows = []
    for image in pixels:
        turns = [k for k in range(4) if np.rot90(image, -k)[1, 1] == 255]
        assert len(turns) == 1
        upright = np.rot90(image, -turns[0])
        rows.append((turns[0], upright[0, 0], upright[0, 1]))
    return np.array(rows)


def rotated_episode(seed, rotations=QUARTER_TURNS, **kwargs):
    images = tf.constant(labelled_images())
    result = episodes.sample_episode(
        images, tf.constant(seed, tf.int64), N_WAY, K_SHOT, N_QUERY, rotations=rotations, **kwargs
    )
    return {key: value.numpy() for key, value in result.items()}


def test_rotations_turn_every_image_of_a_class_alike():
    for i in range(20):
        result = rotated_episode([i, 4])
        support = turns_and_provenance(result["support_x"])
        query = turns_and_provenance(result["query_x"])
        for label in range(N_WAY):
            turns = np.concatenate(
                [support[result["support_y"] == label, 0], query[result["query_y"] == label, 0]]
            )
            assert len(set(turns)) == 1


def test_rotations_draw_the_same_classes_and_examples_as_no_rotations():
    for i in range(10):
        turned, upright = rotated_episode([i, 5]), episode([i, 5])
        for key in ("support", "query"):
            np.testing.assert_array_equal(
                turns_and_provenance(turned[f"{key}_x"])[:, 1:], provenance(upright[f"{key}_x"])
            )
            np.testing.assert_array_equal(turned[f"{key}_y"], upright[f"{key}_y"])


def test_rotations_are_drawn_uniformly_and_independently_per_class():
    per_class = np.array(
        [
            turns_and_provenance(rotated_episode([i, 6])["support_x"])[::K_SHOT, 0]
            for i in range(200)
        ]
    )
    counts = np.bincount(per_class.ravel(), minlength=4)
    # 1000 draws: each turn's count is 250 ± 14 (one standard deviation); 5 sigma either side.
    assert (np.abs(counts - 250) < 70).all(), counts
    # Independent per class: classes of one episode often differ in their turn.
    assert np.mean([len(set(row)) > 1 for row in per_class]) > 0.9


@pytest.mark.parametrize("angle,quarter_turns", [(90, 1), (180, 2), (270, 3)])
def test_a_single_rotation_turns_every_class_by_it_counter_clockwise(angle, quarter_turns):
    # np.rot90 and tf.image.rot90 turn counter-clockwise; 90 and 270 tell the direction.
    result = rotated_episode([1, 7], rotations=(angle,))
    assert set(turns_and_provenance(result["support_x"])[:, 0]) == {quarter_turns}
    assert set(turns_and_provenance(result["query_x"])[:, 0]) == {quarter_turns}


def test_episode_rotations_follow_the_split_into_the_dataset():
    dataset = episodes.episode_dataset(
        labelled_images(), N_WAY, K_SHOT, N_QUERY, 4, 0, rotations=QUARTER_TURNS
    )
    support = unbatched(as_numpy(dataset.take(5)))["support_x"]
    turns = turns_and_provenance(support.reshape(-1, 2, 2, 1))[:, 0]
    assert set(turns) == {0, 1, 2, 3}


def test_rotations_that_are_not_distinct_quarter_turns_are_refused():
    for rotations in [(), (45,), (0, 360)]:
        with pytest.raises(ValueError, match="distinct multiples of 90 degrees"):
            episodes.episode_dataset(
                labelled_images(), N_WAY, K_SHOT, N_QUERY, 4, 0, rotations=rotations
            )
    with pytest.raises(ValueError, match="need square images"):
        episodes.make_split(np.zeros([3, 4, 2, 3, 1], np.uint8), "abc", episode_rotations=(0, 90))
