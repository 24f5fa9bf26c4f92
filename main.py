"""Meta-train and meta-test MAML from the command line.

    python main.py                                  # sinusoid regression, the paper's settings
    python main.py --k_shot=5 --model_dir=runs/k5   # another K
    python main.py --mode=eval --model_dir=runs/k5  # meta-test a saved run again
    python main.py --mode=export --model_dir=runs/k5 --export_dir=exports/k5
    python main.py --mode=tune --tuner=bayesian --max_trials=20 --train_steps=5000
    python main.py --flagfile=runs/sinusoid/tuning/best.flags --model_dir=runs/tuned
    python main.py --helpfull                       # every flag

All logic lives in `maml_tf`, so tests and notebooks call the same functions with a Config.
"""

import os
import sys

# Fewer of TensorFlow's C++ start-up lines; set before TensorFlow is imported. TF 2.21 prints
# the ones logged before absl::InitializeLog whatever the level.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags as absl_flags  # noqa: E402

import flags  # noqa: E402
from maml_tf.errors import UserError  # noqa: E402

flags.define_flags()
FLAGS = absl_flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    config = flags.to_config(FLAGS)
    # Imported here so that a bad flag is reported before TensorFlow spends seconds loading.
    from maml_tf import training, tuning

    run = {
        "train": training.train,
        "eval": training.evaluate,
        "export": training.export_run,
        "tune": tuning.tune,
    }
    try:
        result = run[FLAGS.mode](config)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    if FLAGS.mode == "export":
        print(f"SavedModel with signatures serve and adapt_and_predict: {result.path}")
    elif FLAGS.mode == "tune":
        print(tuning.summary(result))
    else:
        print(training.summary(result))


def run():
    app.run(main)


if __name__ == "__main__":
    run()
