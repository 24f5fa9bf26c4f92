"""The shipped experiment flagfiles parse into the runs the README reports."""

import glob
import os

import pytest
from absl import flags as absl_flags
from cli import ROOT

import flags

FLAGFILES = sorted(glob.glob(os.path.join(ROOT, "experiments", "*.flags")))
# (n_way, k_shot, first_order) of each experiment, as its name and the paper's table say.
EXPECTED = {
    "omniglot_5w1s": (5, 1, False),
    "omniglot_5w5s": (5, 5, False),
    "omniglot_20w1s": (20, 1, False),
    "omniglot_20w5s": (20, 5, False),
    "omniglot_5w1s_first_order": (5, 1, True),
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
    assert (config.n_way, config.k_shot, config.first_order) == EXPECTED[name]
    assert config.dataset == "omniglot" and config.split == "maml"
    assert config.model_dir == f"runs/{name}" and config.data_dir == "/data/omniglot"
    assert config.eval_inner_steps == 10 and config.test_tasks == 600
