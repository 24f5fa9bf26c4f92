"""Meta-train and meta-test MAML from the command line.

    python main.py                                  # sinusoid regression, the paper's settings
    python main.py --k_shot=5 --model_dir=runs/k5   # another K
    python main.py --mode=eval --model_dir=runs/k5  # meta-test a saved run again
    python main.py --mode=validate --model_dir=runs/k5  # its θ on the validation tasks
    python main.py --mode=export --model_dir=runs/k5 --export_dir=exports/k5
    python main.py --mode=tune --tuner=bayesian --max_trials=20 --train_steps=5000
    python main.py --flagfile=runs/sinusoid/tuning/best.flags --model_dir=runs/tuned
    python main.py --helpfull                       # every flag

All logic lives in `maml_tf`, so tests and notebooks call the same functions with a Config.
"""

import os
import signal
import sys

# Fewer of TensorFlow's C++ start-up lines; set before TensorFlow is imported. TF 2.21 prints
# the ones logged before absl::InitializeLog whatever the level.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags as absl_flags  # noqa: E402

import flags  # noqa: E402
from maml_tf.config import ONEDNN_ENV  # noqa: E402
from maml_tf.errors import Stopped, Terminated, UserError, raise_on_sigterm  # noqa: E402

flags.define_flags()
FLAGS = absl_flags.FLAGS


# What a Ctrl-C or SIGTERM outside meta-training's clean stop leaves, by mode.
AGAIN = {
    "train": "the saves made before it are intact; the same command run again continues from "
    "the newest",
    "eval": "nothing was written; run the same command again to meta-test",
    "validate": "nothing was written; run the same command again to validate",
    "export": "--export_dir is as it was before; run the same command again to export",
    "tune": "the same command run again continues the search (the trial that was running "
    "from its last save)",
}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    config = flags.to_config(FLAGS)
    # Else a scheduler's SIGTERM outside meta-training would end the process without a line.
    raise_on_sigterm()
    onednn = ONEDNN_ENV[FLAGS.onednn]
    if onednn is not None:
        # TensorFlow reads it once, as it loads, which the import below does.
        if "tensorflow" in sys.modules and os.environ.get("TF_ENABLE_ONEDNN_OPTS") != onednn:
            print(
                f"error: --onednn={FLAGS.onednn}: TensorFlow was loaded before main.py could "
                "set TF_ENABLE_ONEDNN_OPTS; set it in the environment instead",
                file=sys.stderr,
            )
            sys.exit(1)
        os.environ["TF_ENABLE_ONEDNN_OPTS"] = onednn
    try:
        # Imported here so that a bad flag is reported before TensorFlow spends seconds loading.
        from maml_tf import training, tuning

        run = {
            "train": training.train,
            "eval": training.evaluate,
            "validate": training.validate,
            "export": training.export_run,
            "tune": tuning.tune,
        }
        result = run[FLAGS.mode](config)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except OSError as error:
        # A file that could not be read or written where no flag names it (a full disk).
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except Stopped as stop:
        print(f"stopped: {stop}", file=sys.stderr)
        sys.exit(128 + stop.signum)
    except (KeyboardInterrupt, Terminated) as interrupt:
        # Outside meta-training (which stops cleanly on the first signal), or a second signal.
        name, signum = (
            ("SIGTERM", signal.SIGTERM)
            if isinstance(interrupt, Terminated)
            else ("Ctrl-C", signal.SIGINT)
        )
        print(f"stopped: {name} during --mode={FLAGS.mode}; {AGAIN[FLAGS.mode]}", file=sys.stderr)
        sys.exit(128 + signum)
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
