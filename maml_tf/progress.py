"""How far a training run or a hyperparameter search has got, read from what it wrote.

`python -m maml_tf.progress DIR` prints, for each kept save, the meta-updates done and the
accumulated training time (`train_seconds`, the wall time spent in `fit`, across resumes), the
seconds per meta-update between consecutive saves, the best save, how many meta-updates are left
and when the next validation comes, and every validation (query accuracy and loss after the last
inner step). DIR is a run's `--model_dir`, or a search's directory (`MODEL_DIR/tuning` by
default), whose trials are reported one after another. A long run's figures are then read off
rather than copied by hand from its log.

A run keeps only its last `--keep_checkpoints` saves (`maml_tf.checkpoints.TrainingState`), so
the speed between older saves is gone with them: read a running job's progress as it goes.
"""

import glob
import os
import sys

if __name__ == "__main__":
    # Run as a command, as main.py: fewer of TensorFlow's C++ start-up lines.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from maml_tf import checkpoints, plots, training, tuning  # noqa: E402
from maml_tf.config import CONFIG_FILE  # noqa: E402
from maml_tf.errors import UserError, run_command  # noqa: E402


def _duration(seconds):
    return f"{seconds / 60:.0f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def _schedule(saves, config):
    """Lines on what is left of a run of `config.train_steps` meta-updates after its last save.

    The time left is estimated at the mean speed since the first kept save, steadier than the
    speed between the last two (a stop's few extra meta-updates, a first epoch's tracing); a
    single save gives no speed, so no estimate.
    """
    done, train_steps = saves[-1].meta_updates, config.train_steps
    if done >= train_steps:
        return [f"  all {train_steps:,d} meta-updates (--train_steps) done"]
    left = train_steps - done
    estimate = ""
    if len(saves) > 1:
        first = saves[0]
        speed = (saves[-1].train_seconds - first.train_seconds) / (done - first.meta_updates)
        estimate = (
            f", about {_duration(left * speed)} at {speed:.2f} s each since {first.meta_updates:,d}"
        )
    every = config.epoch_steps
    return [
        f"  left: {left:,d} of {train_steps:,d} meta-updates (--train_steps){estimate}",
        f"  next validation at {(done // every + 1) * every:,d} meta-updates "
        f"(every {every:,d}, --steps_per_epoch)",
    ]


def _saves(title, directory, config=None):
    """Lines for the saves of one learner in `directory` (`.../checkpoints/<name>`), or [].

    With the run's `config`, the last lines say how many meta-updates are left and when the
    next validation comes.
    """
    latest = os.path.join(directory, checkpoints.LATEST)
    saves = checkpoints.read_saves(latest)
    if not saves:
        return []
    lines = [
        f"{title}: saves in {latest}",
        "  meta-updates  train_seconds   hours  s/meta-update since the save before",
    ]
    previous = None
    for save in saves:
        speed = ""
        if previous is not None:
            seconds = save.train_seconds - previous.train_seconds
            speed = f"{seconds / (save.meta_updates - previous.meta_updates):.2f}"
        lines.append(
            f"  {save.meta_updates:12,d}  {save.train_seconds:13,.1f}  "
            f"{save.train_seconds / 3600:6.2f}  {speed}".rstrip()
        )
        previous = save
    for best in checkpoints.read_saves(os.path.join(directory, checkpoints.BEST)):
        lines.append(
            f"  best: {best.meta_updates:,d} meta-updates, validation score "
            f"{best.best_score:.4f}, {best.train_seconds:,.1f} s"
        )
    if config is not None:
        lines += _schedule(saves, config)
    return lines


def _validations(log_dir, indent):
    """Lines for every validation logged in `log_dir`: query accuracy and loss by meta-update.

    A column is left out when it was never logged (a regression run logs no accuracy).
    """
    accuracy, loss = plots.read_scalars(
        log_dir, (plots.VALIDATION_ACCURACY_TAG, plots.VALIDATION_LOSS_TAG)
    ).values()
    columns = [
        (title, values, show)
        for title, values, show in (
            ("query accuracy", accuracy, lambda value: f"{100 * value:.2f}%"),
            ("query loss", loss, "{:.4f}".format),
        )
        if values
    ]
    lines = [f"{indent}validation, after the last inner step ({log_dir}):"]
    if not columns:
        return [*lines, f"{indent}  none logged"]
    lines.append(f"{indent}  meta-updates" + "".join(f"  {title}" for title, _, _ in columns))
    for step in sorted(set().union(*(values for _, values, _ in columns))):
        cells = "".join(
            f"  {show(values[step]) if step in values else '':>{len(title)}}"
            for title, values, show in columns
        )
        lines.append(f"{indent}  {step:12,d}{cells}".rstrip())
    return lines


def _trial_order(trial):
    """The sort key of `trial_<id>`: its number.

    keras-tuner pads an id to the digits of `max_trials`, which a continued search may raise: a
    search of 9 trials continued to 20 holds `trial_8`, then `trial_09` and `trial_10`.
    """
    number = trial.removeprefix("trial_")
    return (0, int(number), trial) if number.isdigit() else (1, 0, trial)


def report(directory):
    """The progress of the run or search in `directory` as text.

    A run (a `--model_dir`) gives one table of saves per learner it saved, then its validations;
    a search (a `--tune_dir`, or the `tuning` directory of a `--model_dir` that holds no run)
    gives, for each trial with a save, the trial's saves and validations.

    Raises:
      UserError: the directory holds no saves of a run or of a trial.
    """
    directory = os.fspath(directory)
    run_saves = os.path.join(checkpoints.CHECKPOINT_DIR, "*", checkpoints.LATEST)
    trial_saves = os.path.join(
        tuning.PROJECT, "trial_*", checkpoints.CHECKPOINT_DIR, checkpoints.LATEST
    )
    lines = []
    learners = [os.path.dirname(latest) for latest in glob.glob(os.path.join(directory, run_saves))]
    config = None
    # Only a run's: saved at each start of its training, so with the last --train_steps given.
    if learners and os.path.exists(os.path.join(directory, CONFIG_FILE)):
        config = training.saved_config(directory)
    for learner in sorted(learners):
        lines += _saves(os.path.basename(learner), learner, config)
    if lines:
        validation = os.path.join(directory, plots.LOG_DIR, plots.VALIDATION_RUN)
        return "\n".join(lines + _validations(validation, ""))
    # A run's search is in MODEL_DIR/tuning unless --tune_dir put it elsewhere.
    for search in (directory, os.path.join(directory, tuning.DEFAULT_DIR)):
        trials = {
            os.path.basename(os.path.dirname(os.path.dirname(latest))): os.path.dirname(latest)
            for latest in glob.glob(os.path.join(search, trial_saves))
        }
        for trial in sorted(trials, key=_trial_order):
            saves = _saves(trial, trials[trial])
            if saves:
                validation = os.path.join(search, tuning.LOG_DIR, trial, plots.VALIDATION_RUN)
                lines += saves + _validations(validation, "  ")
        if lines:
            return "\n".join(lines)
    raise UserError(
        f"{directory}: no saves under {run_saves} (a run) or {trial_saves} "
        f"(a search, in MODEL_DIR/{tuning.DEFAULT_DIR} by default)"
    )


def main(argv):
    """`python -m maml_tf.progress DIR`: a run's or a search's saves, speed and validations."""
    return run_command(
        argv,
        "python -m maml_tf.progress MODEL_DIR|TUNE_DIR",
        lambda args: len(args) == 1,
        lambda directory: print(report(directory)),
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv))
