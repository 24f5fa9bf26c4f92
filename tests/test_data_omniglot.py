"""Tests of maml_tf.data.omniglot on tiny official-layout files from tests/omniglot_fixture.py."""

import io
import logging
import os
import zipfile

import numpy as np
import omniglot_fixture
import pytest
import tensorflow as tf
from PIL import Image

from maml_tf.data import omniglot
from maml_tf.data.episodes import episode_dataset
from maml_tf.errors import UserError

# 2 alphabets x 3 characters x 20 images per part.
EXPECTED = (6, 6)


@pytest.fixture(name="data_dir")
def fixture_data_dir(tmp_path):
    directory = tmp_path / "omniglot"
    omniglot_fixture.write_omniglot(directory)
    return directory


@pytest.fixture(name="data", scope="module")
def fixture_data(tmp_path_factory):
    directory = tmp_path_factory.mktemp("omniglot")
    omniglot_fixture.write_omniglot(directory)
    return omniglot.load_omniglot(directory, expected_characters=EXPECTED)


def write_zips(directory, background=None, evaluation=None):
    """Writes both parts as zips, the fixture's members unless given."""
    for part, members in (("background", background), ("evaluation", evaluation)):
        if members is None:
            members = omniglot_fixture.omniglot_members(part)
        omniglot_fixture.write_zip(directory / f"images_{part}.zip", members)


def load(data_dir, **kwargs):
    return omniglot.load_omniglot(data_dir, expected_characters=EXPECTED, **kwargs)


def assert_one_line(error):
    assert "\n" not in str(error.value)


def test_arrays_have_the_documented_shape_dtype_and_names(data):
    assert data.background.images.shape == (6, 20, 28, 28, 1)
    assert data.evaluation.images.shape == (6, 20, 28, 28, 1)
    assert data.background.images.dtype == np.uint8
    assert data.background.names[:2] == (
        "Background_Alphabet_0/character01",
        "Background_Alphabet_0/character02",
    )
    assert data.evaluation.names[-1] == "Evaluation_Alphabet_1/character03"


def test_counts_are_logged_per_part(data_dir, caplog):
    # On the absl logger itself, so the level of that logger cannot hide the records: an
    # in-process tf.saved_model.save earlier in the same worker (outside maml_tf.export, which
    # puts it back) pins it at WARNING, and a fresh-clone CI run once captured nothing here.
    with caplog.at_level(logging.INFO, logger="absl"):
        load(data_dir)
    assert "background: 6 characters, 120 images" in caplog.text
    assert "evaluation: 6 characters, 120 images" in caplog.text


def test_ink_is_high_after_resizing(tmp_path):
    members = omniglot_fixture.omniglot_members("background")
    # White paper with a black (ink) square in the middle.
    pixels = np.ones([105, 105], bool)
    pixels[30:75, 30:75] = False
    first = sorted(members)[0]
    members[first] = omniglot_fixture.png_bytes(pixels)
    write_zips(tmp_path, background=members)
    image = load(tmp_path).background.images[0, 0, ..., 0]
    assert image[14, 14] == 255
    assert image[0, 0] == 0


def test_lanczos_keeps_grey_levels_and_nearest_is_binary(data_dir):
    smooth = load(data_dir).background.images
    binary = load(data_dir, resample="nearest").background.images
    assert len(np.unique(smooth)) > 2
    assert set(np.unique(binary)) <= {0, 255}


def test_zip_and_extracted_folder_give_identical_arrays(tmp_path, data):
    omniglot_fixture.write_omniglot(tmp_path, form="folder")
    from_folder = load(tmp_path)
    assert not (tmp_path / "images_background.zip").exists()
    for zipped, extracted in zip(data, from_folder, strict=True):
        np.testing.assert_array_equal(zipped.images, extracted.images)
        assert zipped.names == extracted.names


def test_missing_data_dir_is_named(tmp_path):
    with pytest.raises(UserError, match="nowhere: no such directory") as error:
        load(tmp_path / "nowhere")
    assert_one_line(error)


def test_missing_zip_is_named(data_dir):
    (data_dir / "images_evaluation.zip").unlink()
    with pytest.raises(UserError, match="images_evaluation.zip is missing") as error:
        load(data_dir)
    assert_one_line(error)


def test_truncated_zip_is_a_user_error(data_dir):
    path = data_dir / "images_background.zip"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match="images_background.zip: not a readable zip") as error:
        load(data_dir)
    assert_one_line(error)


def test_corrupted_png_member_is_named(tmp_path):
    members = omniglot_fixture.omniglot_members("background")
    broken = sorted(members)[7]
    members[broken] = members[broken][:40]
    write_zips(tmp_path, background=members)
    with pytest.raises(UserError, match=f"cannot read image '{broken}'") as error:
        load(tmp_path)
    assert_one_line(error)


def test_character_with_too_few_images_is_named(tmp_path):
    members = omniglot_fixture.omniglot_members("evaluation")
    del members[sorted(members)[-1]]
    write_zips(tmp_path, evaluation=members)
    with pytest.raises(
        UserError, match="character 'Evaluation_Alphabet_1/character03' has 19 images, expected 20"
    ) as error:
        load(tmp_path)
    assert_one_line(error)


def test_wrong_number_of_characters_says_found_and_expected(data_dir):
    with pytest.raises(UserError, match="found 6 characters, expected 964") as error:
        omniglot.load_omniglot(data_dir)
    assert_one_line(error)


def test_empty_character_folder_is_named(tmp_path):
    omniglot_fixture.write_omniglot(tmp_path, form="folder")
    (tmp_path / "images_background" / "Background_Alphabet_0" / "character04").mkdir()
    with pytest.raises(UserError, match="'Background_Alphabet_0/character04' holds no PNG"):
        load(tmp_path)


def test_png_outside_the_layout_is_named(tmp_path):
    members = omniglot_fixture.omniglot_members("background")
    members["images_background/stray.png"] = next(iter(members.values()))
    write_zips(tmp_path, background=members)
    with pytest.raises(UserError, match="'images_background/stray.png' is not laid out"):
        load(tmp_path)


def test_cache_is_reused_without_decoding(data_dir, tmp_path, monkeypatch, data):
    cache_dir = tmp_path / "cache"
    load(data_dir, cache_dir=cache_dir)

    def fail(*args, **kwargs):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(omniglot, "_decode_characters", fail)
    cached = load(data_dir, cache_dir=cache_dir)
    for fresh, reread in zip(data, cached, strict=True):
        np.testing.assert_array_equal(fresh.images, reread.images)
        assert fresh.names == reread.names


def test_cache_is_reused_for_the_same_files_with_new_modification_times(
    data_dir, tmp_path, monkeypatch
):
    cache_dir = tmp_path / "cache"
    load(data_dir, cache_dir=cache_dir)
    for path in data_dir.iterdir():
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))

    def fail(*args, **kwargs):
        raise AssertionError("decoded again although only modification times changed")

    monkeypatch.setattr(omniglot, "_decode_characters", fail)
    load(data_dir, cache_dir=cache_dir)
    assert len(list(cache_dir.glob("omniglot_*.npz"))) == 1


def test_cache_is_invalidated_when_a_zip_changes(data_dir, tmp_path):
    cache_dir = tmp_path / "cache"
    first = load(data_dir, cache_dir=cache_dir)
    members = omniglot_fixture.omniglot_members("evaluation")
    name = sorted(members)[0]
    members[name] = omniglot_fixture.png_bytes(
        np.zeros((omniglot_fixture.IMAGE_SIDE,) * 2, dtype=bool)
    )
    path = data_dir / "images_evaluation.zip"
    stat = path.stat()
    omniglot_fixture.write_zip(path, members)
    # Same modification time as before, so only the contents tell the files apart.
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = load(data_dir, cache_dir=cache_dir)
    assert len(list(cache_dir.glob("omniglot_*.npz"))) == 2
    assert not np.array_equal(first.evaluation.images, second.evaluation.images)


def test_nothing_is_written_to_the_data_dir(data_dir, tmp_path):
    before = sorted(data_dir.rglob("*"))
    load(data_dir, cache_dir=tmp_path / "cache")
    assert sorted(data_dir.rglob("*")) == before


def test_maml_split_sizes_with_rotations_as_classes(data):
    splits = omniglot.omniglot_splits(data, "maml", num_train=6, num_val=2, rotation="classes")
    assert [len(split.names) for split in splits] == [24, 8, 16]
    assert [split.images.shape[0] for split in splits] == [24, 8, 16]
    assert all((split.counts == 20).all() for split in splits)
    assert all(split.episode_rotations == (0,) for split in splits)


def test_maml_split_with_rotations_per_episode_keeps_the_characters_upright(data):
    turned = omniglot.omniglot_splits(data, "maml", num_train=6, num_val=2)
    upright = omniglot.omniglot_splits(data, "maml", num_train=6, num_val=2, rotations=[0])
    assert [split.images.shape[0] for split in turned] == [6, 2, 4]
    for with_rotations, without in zip(turned, upright, strict=True):
        assert with_rotations.names == without.names
        np.testing.assert_array_equal(with_rotations.images, without.images)
        assert with_rotations.episode_rotations == (0, 90, 180, 270)


def test_no_rotation_keeps_the_maml_split_upright(data):
    upright = omniglot.omniglot_splits(data, "maml", num_train=6, num_val=2, rotation="none")
    turned = omniglot.omniglot_splits(data, "maml", num_train=6, num_val=2)
    for without, with_rotations in zip(upright, turned, strict=True):
        assert without.names == with_rotations.names
        np.testing.assert_array_equal(without.images, with_rotations.images)
        assert without.episode_rotations == (0,)
    with pytest.raises(ValueError, match="rotation 'none' turns nothing"):
        omniglot.omniglot_splits(
            data, "maml", num_train=6, num_val=2, rotation="none", rotations=[0, 90]
        )


def test_an_unknown_rotation_is_refused(data):
    with pytest.raises(ValueError, match="rotation must be one of"):
        omniglot.omniglot_splits(data, "maml", num_train=6, num_val=2, rotation="both")


def test_maml_rotated_class_is_rot90_of_its_source(data):
    train = omniglot.omniglot_splits(data, "maml", num_train=6, num_val=2, rotation="classes").train
    source = train.images[1]
    rotated = train.names.index(train.names[1] + "/rot270")
    np.testing.assert_array_equal(train.images[rotated], np.rot90(source, 3, axes=(1, 2)))


def test_maml_split_is_a_seeded_permutation_of_all_characters(data):
    def train_names(seed):
        splits = omniglot.omniglot_splits(data, "maml", seed, num_train=6, num_val=2, rotations=[0])
        return splits.train.names

    all_names = data.background.names + data.evaluation.names
    order = np.random.RandomState(1).permutation(12)
    assert train_names(1) == tuple(all_names[i] for i in order[:6])
    assert train_names(1) != train_names(2)


def test_lake_split_tests_on_evaluation_and_validates_on_whole_alphabets(data):
    splits = omniglot.omniglot_splits(data, "lake", val_alphabets=1)
    np.testing.assert_array_equal(splits.test.images, data.evaluation.images)
    assert all(split.episode_rotations == (0,) for split in splits)
    alphabet = {name.split("/")[0] for name in splits.val.names}
    assert len(alphabet) == 1
    assert not any(name.startswith(tuple(alphabet)) for name in splits.train.names)
    assert sorted(splits.train.names + splits.val.names) == sorted(data.background.names)


@pytest.mark.parametrize(
    "split,rotation",
    [("maml", "episode"), ("maml", "classes"), ("maml", "none"), ("lake", "none")],
)
def test_training_episodes_never_touch_validation_or_test_images(data, split, rotation):
    splits = omniglot.omniglot_splits(
        data, split, num_train=6, num_val=2, val_alphabets=1, rotation=rotation
    )
    # Every turn of every held-out image, so that a turned one is caught too.
    held_out = {
        np.ascontiguousarray(np.rot90(image, k)).tobytes()
        for part in (splits.val, splits.test)
        for image in part.images.reshape(-1, 28, 28, 1)
        for k in range(4)
    }
    dataset = episode_dataset(
        splits.train.images, 3, 1, 5, 8, seed=0, rotations=splits.train.episode_rotations
    ).take(4)
    seen = 0
    for batch in dataset:
        for key in ("support_x", "query_x"):
            images = np.round(batch[key].numpy() * 255).astype(np.uint8).reshape(-1, 28, 28, 1)
            assert not any(image.tobytes() in held_out for image in images)
            seen += len(images)
    assert seen == 4 * 8 * 3 * 6


def tfds_elements(part):
    """The fixture's part as TFDS would give it, characters interleaved as in its records."""
    members = omniglot_fixture.omniglot_members(part)
    alphabets = sorted(
        omniglot_fixture.alphabet_names("background", 2)
        + omniglot_fixture.alphabet_names("evaluation", 2)
    )
    by_character = {}
    for name in sorted(members):
        _, alphabet, character, file_name = name.split("/")
        key = (alphabets.index(alphabet), int(character[len("character") :]) - 1)
        image = np.asarray(Image.open(io.BytesIO(members[name])).convert("RGB"))
        label = int(file_name.split("_")[0]) - 1
        by_character.setdefault(key, []).append((image, label))
    elements = [
        (image, label, alphabet, char_id)
        for images in zip(*by_character.values(), strict=True)
        for (alphabet, char_id), (image, label) in zip(by_character, images, strict=True)
    ]
    images, labels, alphabet_ids, char_ids = (
        np.array(column) for column in zip(*elements, strict=True)
    )
    dataset = tf.data.Dataset.from_tensor_slices(
        {
            "image": images.astype(np.uint8),
            "label": labels.astype(np.int64),
            "alphabet": alphabet_ids.astype(np.int64),
            "alphabet_char_id": char_ids.astype(np.int64),
        }
    )
    return dataset, alphabets


def test_tfds_elements_convert_to_the_arrays_of_the_files(data):
    dataset, alphabets = tfds_elements("evaluation")
    assert dataset.element_spec["image"].shape == (105, 105, 3)
    part = omniglot.omniglot_part_from_tfds(dataset, alphabets, expected_characters=6)
    np.testing.assert_array_equal(part.images, data.evaluation.images)
    assert part.names == data.evaluation.names


def test_tfds_offline_is_a_user_error_pointing_to_data_dir(tmp_path, monkeypatch):
    # Offline TFDS retries for minutes; the probe is what makes this fail fast.
    monkeypatch.setattr(omniglot, "_can_connect", lambda host: False)
    with pytest.raises(UserError, match="could not be downloaded.*--data_dir") as error:
        omniglot.load_omniglot_tfds(tmp_path / "tfds")
    assert_one_line(error)


def test_zip_members_are_read_not_extracted(data_dir):
    with zipfile.ZipFile(data_dir / "images_background.zip") as archive:
        assert archive.namelist()[0] == "images_background/"
    load(data_dir)
    assert not (data_dir / "images_background").exists()
