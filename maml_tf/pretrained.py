"""Meta-trained models as shipped files: the learner's weights plus the config that built it.

A pretrained model is a directory holding `config.json` (a `maml_tf.config.Config` without
machine paths) and `learner.weights.h5` (θ), a few hundred KB for Omniglot's conv4. Load one
and adapt it to a new task in one line:

    >>> model = maml_tf.pretrained.load("pretrained/omniglot_5w1s")
    >>> fast_weights = model.adapt(support_x, support_y)   # eval_inner_steps steps of size α
    >>> labels = tf.argmax(model.forward(fast_weights, query_x), axis=-1)

`support_x: float32 [n_way*k_shot, 28, 28, 1]`, `support_y: int32 [n_way*k_shot]` with labels
0..n_way-1, `query_x: float32 [n, 28, 28, 1]`, images prepared as `maml_tf.data.omniglot` does.
The conv4 learner normalises with the statistics of the batch it is given, as in the paper's
meta-training and meta-testing, so classify a task's queries together, not one at a time.

Make one from a training run with

    python -m maml_tf.pretrained RUN_DIR OUT_DIR
"""

import dataclasses
import json
import os
import sys

if __name__ == "__main__":
    # Run as a command, as main.py: fewer of TensorFlow's C++ start-up lines. TF 2.21 prints
    # the ones logged before absl::InitializeLog whatever the level, so the error is the last line.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from maml_tf import checkpoints, training  # noqa: E402
from maml_tf.config import CONFIG_FILE  # noqa: E402
from maml_tf.errors import run_command  # noqa: E402

# Where the run's files were on the machine that trained it: meaningless elsewhere.
_MACHINE_FIELDS = ("model_dir", "data_dir", "cache_dir", "init_from", "export_dir", "tune_dir")


def load(directory, checkpoint="best"):
    """The MAML model saved in a pretrained directory or a training run, with θ loaded.

    Args:
      directory: a pretrained model (`config.json`, `learner.weights.h5`) or a run dir.
      checkpoint: "best" (the best-validation weights, when the directory has them) or "final".

    Returns:
      `maml_tf.MAML` with the saved α and `eval_inner_steps`, ready for `adapt`/`forward`.

    Raises:
      UserError: no model there, or weights that do not fit its config.
    """
    return _load(training.saved_config(directory), directory, checkpoint)


def _load(config, directory, checkpoint):
    config = dataclasses.replace(config, checkpoint=checkpoint)
    model = training.build_model(config, training.build_learner(config))
    training.load_weights(config, model, directory)
    return model


def package(run_dir, out_dir, checkpoint="best"):
    """Writes a run's weights and config as a pretrained model in `out_dir`.

    The config's machine paths are cleared (give `--data_dir` when evaluating), and the run's
    `results.json` is kept beside them, with the same config, as the record of what the model
    scored.

    Returns:
      The list of files written.
    """
    config = training.saved_config(run_dir)
    model = _load(config, run_dir, checkpoint)
    os.makedirs(out_dir, exist_ok=True)
    cleared = dataclasses.replace(config, **{name: None for name in _MACHINE_FIELDS})
    # Thread pools suit the training machine, not the user's (README, Speed).
    cleared = dataclasses.replace(
        cleared, allow_changed=(), verbose=1, inter_op_threads=0, intra_op_threads=0
    )
    written = [os.path.join(out_dir, CONFIG_FILE), os.path.join(out_dir, training.FINAL_WEIGHTS)]
    cleared.save(written[0])
    checkpoints.atomic_save_weights(model.learner, written[1])
    results_path = os.path.join(run_dir, training.RESULTS)
    if os.path.exists(results_path):
        with open(results_path) as f:
            results = json.load(f)
        results["config"] = dataclasses.asdict(cleared)
        if "weights" in results.get("protocol", {}):
            results["protocol"]["weights"] = os.path.basename(results["protocol"]["weights"])
        written.append(os.path.join(out_dir, training.RESULTS))
        with open(written[-1], "w") as f:
            json.dump(results, f, indent=2, sort_keys=True)
            f.write("\n")
    return written


def main(argv):
    """`python -m maml_tf.pretrained RUN_DIR OUT_DIR`: package a run; prints the files written."""
    return run_command(
        argv,
        "python -m maml_tf.pretrained RUN_DIR OUT_DIR",
        lambda args: len(args) == 2,
        lambda run_dir, out_dir: print(*package(run_dir, out_dir), sep="\n"),
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv))
