"""The shipped experiment flagfiles parse into the runs the README reports."""

import glob
import json
import os

import numpy as np
import pytest
from absl import flags as absl_flags
from cli import ROOT

import flags
from maml_tf import pretrained

FLAGFILES = sorted(glob.glob(os.path.join(ROOT, "experiments", "*.flags")))
# (n_way, k_shot, first_order, inner_lr, inner_steps, meta_batch_size) of each experiment: its
# name and the paper's table and appendix A.1 (5-way: one step, 32 tasks; 20-way: five steps, 16
# tasks), with the paper's α (its 0.4 and 0.1 are 2.0 on our mean loss: README, Losses and what α
# means) except first order's, chosen on meta-validation (its flagfile says why).
EXPECTED = {
    "omniglot_5w1s": (5, 1, False, 2.0, 1, 32),
    "omniglot_5w5s": (5, 5, False, 2.0, 1, 32),
    "omniglot_20w1s": (20, 1, False, 2.0, 5, 16),
    "omniglot_20w5s": (20, 5, False, 2.0, 5, 16),
    "omniglot_5w1s_first_order": (5, 1, True, 0.4, 1, 32),
}


def test_every_experiment_has_a_flagfile():
    assert sorted(os.path.basename(p)[: -len(".flags")] for p in FLAGFILES) == sorted(EXPECTED)


@pytest.mark.parametrize("path", FLAGFILES, ids=os.path.basename)
def test_a_flagfile_describes_its_experiment(path):
    flag_values = absl_flags.FlagValues()
    flags.define_flags(flag_values)
    flag_values(["main.py", f"--flagfile={path}", "--data_dir=/data/omniglot"])
    config = flags.to_config(flag_values).resolve()
    name = os.path.basename(path)[: -len(".flags")]
    assert (
        config.n_way,
        config.k_shot,
        config.first_order,
        config.inner_lr,
        config.inner_steps,
        config.meta_batch_size,
    ) == EXPECTED[name]
    # The paper's β, its 60,000 meta-updates and its query set (K per class, as its code).
    assert (config.outer_lr, config.train_steps, config.n_query) == (1e-3, 60000, config.k_shot)
    assert config.dataset == "omniglot" and config.split == "maml"
    assert config.model_dir == f"runs/{name}" and config.data_dir == "/data/omniglot"
    assert config.eval_inner_steps == 10 and config.test_tasks == 600


SHIPPED = sorted(glob.glob(os.path.join(ROOT, "pretrained", "*", "config.json")))


def test_the_5_way_1_shot_model_is_shipped():
    assert os.path.join(ROOT, "pretrained", "omniglot_5w1s", "config.json") in SHIPPED


@pytest.mark.parametrize("config_path", SHIPPED, ids=lambda p: os.path.basename(os.path.dirname(p)))
def test_a_shipped_model_loads_and_adapts_without_its_training_machine(config_path):
    directory = os.path.dirname(config_path)
    with open(config_path) as f:
        shipped = json.load(f)
    assert shipped["data_dir"] is None and shipped["model_dir"] is None
    assert os.path.getsize(os.path.join(directory, "learner.weights.h5")) < 1_000_000
    model = pretrained.load(directory)
    n_way = model.learner.output_shape[-1]
    x = np.random.default_rng(0).random((n_way, 28, 28, 1), dtype=np.float32)
    labels = np.arange(n_way, dtype=np.int32)
    logits = model.forward(model.adapt(x, labels), x).numpy()
    assert logits.shape == (n_way, n_way) and np.isfinite(logits).all()
