"""Tests of maml_tf.data.folder on tiny `DIR/{train,val,test}/<class>/<image>` trees."""

import numpy as np
import pytest
from PIL import Image

from maml_tf.data import folder
from maml_tf.data.episodes import episode_dataset
from maml_tf.errors import UserError

# Images per class and split; train's classes differ in size on purpose.
LAYOUT = {"train": {"cat": 3, "dog": 5, "emu": 4}, "val": {"fox": 4, "gnu": 4}, "test": {"hen": 2}}


def write_tree(root, layout=None, side=10):
    """Writes solid-colour images; the colour encodes (split, class, index)."""
    layout = LAYOUT if layout is None else layout
    for s, (split, classes) in enumerate(layout.items()):
        for c, (name, count) in enumerate(classes.items()):
            directory = root / split / name
            directory.mkdir(parents=True)
            for i in range(count):
                colour = (40 * s + 1, 40 * c + 1, 20 * i + 1)
                Image.new("RGB", (side, side), colour).save(directory / f"{i:03d}.png")
    return root


def test_split_arrays_are_padded_to_the_largest_class(tmp_path):
    splits = folder.load_image_folder(write_tree(tmp_path), image_size=6)
    assert splits.train.images.shape == (3, 5, 6, 6, 3)
    assert splits.train.images.dtype == np.uint8
    assert splits.train.counts.tolist() == [3, 5, 4]
    assert splits.train.counts.dtype == np.int32
    assert splits.train.names == ("cat", "dog", "emu")
    assert splits.test.images.shape == (1, 2, 6, 6, 3)


def test_padding_is_zero_and_real_images_keep_their_colour(tmp_path):
    train = folder.load_image_folder(write_tree(tmp_path), image_size=6).train
    assert (train.images[0, 3:] == 0).all()
    # Class "dog" (index 1) of split train (index 0), image 2: colour (1, 41, 41).
    assert train.images[1, 2, 3, 3].tolist() == [1, 41, 41]


def test_images_are_resized_to_image_size(tmp_path):
    splits = folder.load_image_folder(write_tree(tmp_path, side=17), image_size=8)
    assert splits.val.images.shape[2:] == (8, 8, 3)


def test_one_channel_is_grayscale(tmp_path):
    splits = folder.load_image_folder(write_tree(tmp_path), image_size=6, channels=1)
    assert splits.train.images.shape[-1] == 1


def test_files_that_are_not_images_are_ignored(tmp_path):
    write_tree(tmp_path)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "cat" / ".hidden.png").write_bytes(b"junk")
    assert folder.load_image_folder(tmp_path, image_size=6).train.counts[0] == 3


def test_missing_data_dir_is_named(tmp_path):
    with pytest.raises(UserError, match="nowhere: no such directory"):
        folder.load_image_folder(tmp_path / "nowhere", image_size=6)


def test_missing_split_folder_is_named(tmp_path):
    write_tree(tmp_path, {"train": {"cat": 3}, "test": {"hen": 2}})
    with pytest.raises(UserError, match="the split folder val/ is missing"):
        folder.load_image_folder(tmp_path, image_size=6)


def test_split_without_class_folders_is_named(tmp_path):
    write_tree(tmp_path, {"train": {"cat": 3}, "test": {"hen": 2}})
    (tmp_path / "val").mkdir()
    with pytest.raises(UserError, match="val: no class folders"):
        folder.load_image_folder(tmp_path, image_size=6)


def test_empty_class_folder_is_named(tmp_path):
    write_tree(tmp_path)
    (tmp_path / "test" / "owl").mkdir()
    with pytest.raises(UserError, match="owl: class folder holds no images"):
        folder.load_image_folder(tmp_path, image_size=6)


def test_unreadable_image_is_named(tmp_path):
    write_tree(tmp_path)
    broken = tmp_path / "val" / "gnu" / "001.png"
    broken.write_bytes(broken.read_bytes()[:30])
    with pytest.raises(UserError, match="gnu/001.png: cannot read image") as error:
        folder.load_image_folder(tmp_path, image_size=6)
    assert "\n" not in str(error.value)


def test_check_episode_shape_names_n_way_and_the_split(tmp_path):
    splits = folder.load_image_folder(write_tree(tmp_path), image_size=6)
    with pytest.raises(UserError, match="--n_way=2 is more than the 1 classes of the test split"):
        folder.check_episode_shape(splits, n_way=2, k_shot=1, n_query=1)


def test_check_episode_shape_names_the_smallest_class(tmp_path):
    splits = folder.load_image_folder(write_tree(tmp_path), image_size=6)
    with pytest.raises(UserError, match=r"--k_shot=1 \+ --n_query=3 .* class 'cat' of the train"):
        folder.check_episode_shape(splits, n_way=1, k_shot=1, n_query=3)


def test_sampler_draws_only_real_images_of_small_classes(tmp_path):
    train = folder.load_image_folder(write_tree(tmp_path), image_size=6).train
    dataset = episode_dataset(train.images, 3, 1, 2, 8, seed=0, counts=train.counts)
    for batch in dataset.take(2):
        images = np.concatenate([batch["support_x"], batch["query_x"]], axis=1)
        # Real images have non-zero colours (see write_tree); padding is all zero.
        assert (images.reshape(-1, 6 * 6 * 3).max(axis=1) > 0).all()
