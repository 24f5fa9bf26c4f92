"""Bad input: one `error:` line naming the flag or file, a non-zero exit, never a traceback.

One test per case a user can meet; each runs `python main.py` as the user would. Flag errors
found by absl's validators come before TensorFlow loads; data and model errors after.
"""

import os
import shutil

import pytest
from cli import ROOT, run_main, run_script, stderr_tail
from folder_fixture import TINY_FOLDER_RUN, write_folder_dataset


def assert_one_error_naming(result, *names):
    """The run failed with exactly one `error:` line (or absl's flag message) naming `names`."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, stderr_tail(result)
    for name in names:
        assert name in result.stderr, (name, stderr_tail(result))
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    if errors:
        assert len(errors) == 1, errors
        assert all(name in errors[0] for name in names), errors[0]


@pytest.fixture
def folder_data(tmp_path):
    return write_folder_dataset(tmp_path / "images", classes=3, images=4, side=8)


# ------------------------------------------------------------------------------------- flags


@pytest.mark.parametrize(
    "flag,name",
    [
        ("--train_steps=0", "train_steps"),
        ("--steps_per_epoch=-5", "steps_per_epoch"),
        ("--k_shot=0", "k_shot"),
        ("--n_way=1", "n_way"),
        ("--checkpoint_every=0", "checkpoint_every"),
        ("--clip_norm=-1", "clip_norm"),
        ("--train_steps=1500", "steps_per_epoch"),
        ("--inter_op_threads=-1", "inter_op_threads"),
        ("--intra_op_threads=-2", "intra_op_threads"),
    ],
)
def test_an_out_of_range_count_names_the_flag(flag, name, tmp_path):
    assert_one_error_naming(run_main(flag, f"--model_dir={tmp_path}/run"), name)


def test_a_search_of_part_epochs_names_the_flag(tmp_path):
    # The sinusoid default is 1,000 meta-updates per epoch.
    result = run_main("--mode=tune", "--train_steps=1500", f"--model_dir={tmp_path}/run")
    assert_one_error_naming(result, "--train_steps=1500", "--steps_per_epoch=1000")


def test_an_image_size_too_small_for_max_pooling_names_the_flag(folder_data, tmp_path):
    result = run_main(
        *TINY_FOLDER_RUN, "--image_size=8", f"--data_dir={folder_data}", f"--model_dir={tmp_path}/r"
    )
    assert_one_error_naming(result, "--image_size=8")


def test_an_unknown_allowed_change_names_it(tmp_path):
    result = run_main("--allow_changed=inner_rate", f"--model_dir={tmp_path}/run")
    assert_one_error_naming(result, "--allow_changed", "inner_rate")


# -------------------------------------------------------------------------------------- data


def test_n_way_larger_than_a_split_names_the_flag_and_split(folder_data, tmp_path):
    result = run_main(
        *TINY_FOLDER_RUN, f"--data_dir={folder_data}", "--n_way=4", f"--model_dir={tmp_path}/run"
    )
    assert_one_error_naming(result, "--n_way=4", "train split")


def test_more_shots_and_queries_than_examples_names_the_flags(folder_data, tmp_path):
    result = run_main(
        *TINY_FOLDER_RUN,
        f"--data_dir={folder_data}",
        "--k_shot=2",
        "--n_query=3",
        f"--model_dir={tmp_path}/run",
    )
    assert_one_error_naming(result, "--k_shot=2", "--n_query=3")


def test_a_model_dir_that_cannot_be_created_is_named(tmp_path):
    (tmp_path / "file").write_text("")
    result = run_main(
        "--train_steps=10", "--steps_per_epoch=10", f"--model_dir={tmp_path}/file/run"
    )
    assert_one_error_naming(result, f"--model_dir={tmp_path}/file/run", "cannot create it")


# main.py where every file write past `limit` bytes fails (EFBIG), as writes fail on a full disk
# (ENOSPC): a real write error from the kernel, without the mount a full disk would need.
LIMITED_MAIN = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY))
sys.path.insert(0, {root!r})
sys.argv = ["main.py", *{args!r}]
runpy.run_path("main.py", run_name="__main__")
"""


def test_an_export_that_cannot_be_written_is_one_line_and_keeps_the_old_export(tmp_path):
    export_dir = tmp_path / "export"
    export_dir.mkdir()
    (export_dir / "saved_model.pb").write_text("the previous export")
    # The shipped 5-way model's variables (about 450 KB) pass the limit; its config does not.
    args = [
        "--mode=export",
        f"--init_from={os.path.join(ROOT, 'pretrained', 'omniglot_5w1s')}",
        f"--export_dir={export_dir}",
        "--overwrite",
    ]
    result = run_script(LIMITED_MAIN.format(limit=100_000, root=ROOT, args=args))
    assert_one_error_naming(result, f"{export_dir}: cannot write the export", "File too large")
    assert result.returncode == 1
    assert (export_dir / "saved_model.pb").read_text() == "the previous export"
    assert sorted(os.listdir(tmp_path)) == ["export"]  # no staging directory left behind


def test_a_missing_data_dir_flag_is_named(tmp_path):
    result = run_main(*TINY_FOLDER_RUN, f"--model_dir={tmp_path}/run")
    assert_one_error_naming(result, "--data_dir")


def test_a_data_dir_that_does_not_exist_is_named(tmp_path):
    result = run_main(
        *TINY_FOLDER_RUN, f"--data_dir={tmp_path}/nowhere", f"--model_dir={tmp_path}/r"
    )
    assert_one_error_naming(result, f"--data_dir={tmp_path}/nowhere")


def test_a_folder_of_the_wrong_layout_is_named(tmp_path):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"")
    result = run_main(*TINY_FOLDER_RUN, f"--data_dir={tmp_path}/flat", f"--model_dir={tmp_path}/r")
    assert_one_error_naming(result, "train/")


def test_an_omniglot_dir_without_the_zips_is_named(tmp_path):
    (tmp_path / "omniglot").mkdir()
    (tmp_path / "omniglot" / "README").write_text("nothing here")
    result = run_main(
        "--dataset=omniglot", f"--data_dir={tmp_path}/omniglot", f"--model_dir={tmp_path}/r"
    )
    assert_one_error_naming(result, f"{tmp_path}/omniglot")


def test_an_unreadable_image_is_named(folder_data, tmp_path):
    broken = folder_data / "val" / "nval001" / "2.jpg"
    broken.write_bytes(b"not a jpeg")
    result = run_main(*TINY_FOLDER_RUN, f"--data_dir={folder_data}", f"--model_dir={tmp_path}/run")
    assert_one_error_naming(result, str(broken))


def test_a_class_with_too_few_images_is_named(folder_data, tmp_path):
    for image in sorted((folder_data / "test" / "ntest002").iterdir())[1:]:
        image.unlink()
    result = run_main(*TINY_FOLDER_RUN, f"--data_dir={folder_data}", f"--model_dir={tmp_path}/run")
    assert_one_error_naming(result, "ntest002", "test split")


def test_an_empty_class_folder_is_named(folder_data, tmp_path):
    empty = folder_data / "train" / "ntrain001"
    shutil.rmtree(empty)
    empty.mkdir()
    result = run_main(*TINY_FOLDER_RUN, f"--data_dir={folder_data}", f"--model_dir={tmp_path}/run")
    assert_one_error_naming(result, str(empty))


# ------------------------------------------------------------------------------------ models


def test_init_from_nothing_is_named(tmp_path):
    result = run_main(f"--init_from={tmp_path}/none", "--mode=eval", f"--model_dir={tmp_path}/r")
    assert_one_error_naming(result, f"--init_from={tmp_path}/none")


def test_training_from_nothing_is_named(tmp_path):
    result = run_main(
        f"--init_from={tmp_path}/none",
        "--train_steps=2",
        "--steps_per_epoch=2",
        f"--model_dir={tmp_path}/run",
    )
    assert_one_error_naming(result, f"--init_from={tmp_path}/none")


@pytest.fixture(scope="module")
def two_way_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("two_way")
    data_dir = write_folder_dataset(root / "images", classes=3, images=4, side=8)
    trained = run_main(*TINY_FOLDER_RUN, f"--data_dir={data_dir}", f"--model_dir={root}/model")
    assert trained.returncode == 0, stderr_tail(trained)
    return data_dir, root / "model"


def test_training_from_a_model_with_other_ways_is_refused(two_way_model, tmp_path):
    data_dir, model = two_way_model
    result = run_main(
        *TINY_FOLDER_RUN,
        f"--data_dir={data_dir}",
        "--n_way=3",
        f"--init_from={model}",
        f"--model_dir={tmp_path}/run",
    )
    assert_one_error_naming(result, f"--init_from={model}", "n_way=2", "n_way=3")


def test_meta_testing_a_model_with_other_ways_is_refused(two_way_model, tmp_path):
    data_dir, model = two_way_model
    result = run_main(
        "--mode=eval",
        f"--data_dir={data_dir}",
        "--n_way=3",
        f"--init_from={model}",
        f"--model_dir={tmp_path}/run",
    )
    assert_one_error_naming(result, "--n_way=3", f"--init_from={model}")


def test_meta_testing_from_init_from_writes_to_model_dir(two_way_model, tmp_path):
    data_dir, model = two_way_model
    result = run_main(
        "--mode=eval",
        f"--data_dir={data_dir}",
        f"--init_from={model}",
        f"--model_dir={tmp_path}/eval",
        "--test_tasks=2",
    )
    assert result.returncode == 0, stderr_tail(result)
    assert (tmp_path / "eval" / "eval_results.json").exists()
