"""End-to-end `main.py --dataset=folder` on a tiny miniImageNet-layout directory."""

import json

from cli import run_main, stderr_tail
from folder_fixture import TINY_FOLDER_RUN, write_folder_dataset


def test_folder_dataset_trains_and_meta_tests(tmp_path):
    data_dir = write_folder_dataset(tmp_path / "images")
    model_dir = tmp_path / "run"
    result = run_main(
        *TINY_FOLDER_RUN,
        f"--data_dir={data_dir}",
        "--test_tasks=4",
        "--eval_inner_steps=2",
        f"--model_dir={model_dir}",
    )
    assert result.returncode == 0, stderr_tail(result)
    assert "MAML query accuracy (%)" in result.stdout
    protocol = json.loads((model_dir / "results.json").read_text())["protocol"]
    assert protocol["classes"] == {"train": 3, "val": 3, "test": 3}
    assert protocol["image_size"] == 16


def test_folder_dataset_with_too_few_images_names_the_flags(tmp_path):
    data_dir = write_folder_dataset(tmp_path / "images", images=2)
    result = run_main(
        "--dataset=folder",
        f"--data_dir={data_dir}",
        "--n_way=2",
        "--k_shot=1",
        "--n_query=5",
        f"--model_dir={tmp_path}/run",
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "--k_shot" in result.stderr and "--n_query" in result.stderr
