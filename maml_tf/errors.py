"""The exceptions that reach the user as a single line, and SIGTERM as an exception."""

import signal
import sys


class UserError(Exception):
    """Bad input from the user: a flag, a file or a directory.

    `main.py` prints `str(error)` as one line and exits with status 1, no traceback. The message
    names the flag or file and says what is wrong, e.g.
    `--data_dir=/x: images_background.zip is missing`.
    """


def run_command(argv, usage, valid, action):
    """The `main` of a `python -m maml_tf.<module>` command: a bad input is one line on stderr.

    Args:
      argv: `sys.argv`.
      usage: the command and its arguments, as `python -m maml_tf.plots OUT.png LABEL=DIR...`.
      valid: whether a list of the arguments (`argv[1:]`) has the right form.
      action: called with the arguments; prints what the command prints.

    Returns:
      The exit status: 2 after printing the usage line for arguments of the wrong form, 1 after
      printing `error: <message>` for a `UserError`, else 0.
    """
    if not valid(argv[1:]):
        print(f"usage: {usage}", file=sys.stderr)
        return 2
    try:
        action(*argv[1:])
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


class Stopped(Exception):  # noqa: N818 - a clean stop, like KeyboardInterrupt
    """Meta-training stopped on a signal (SIGTERM, or Ctrl-C's SIGINT) after saving its state.

    `main.py` prints `str(stop)` as one line and exits with status 128 + `signum`, the shell's
    status for a process ended by that signal, so a scheduler sees the run as terminated.
    Running the same command again continues the run from the save, e.g.
    `SIGTERM after meta-update 1234: saved in runs/o5/checkpoints/maml/latest/ckpt-1234; run
    the same command again to continue`.

    Attributes:
      signum: the signal's number.
      step: the meta-updates done and saved, or None when the stop saved nothing (a search
        stopped between two trials or after its last).
    """

    def __init__(self, message, signum, step):
        super().__init__(message)
        self.signum = signum
        self.step = step


class Terminated(BaseException):  # noqa: N818 - a signal, like KeyboardInterrupt
    """SIGTERM, raised in the main thread as Python raises `KeyboardInterrupt` for SIGINT.

    A BaseException, as `KeyboardInterrupt` is, so that no `except Exception` swallows it.
    Raised only in a process that called `raise_on_sigterm` (`main.py` does); elsewhere SIGTERM
    keeps its default, which ends the process without a word.
    """


def _raise_terminated(signum, frame):
    raise Terminated


def raise_on_sigterm():
    """Makes SIGTERM raise `Terminated` in the main thread instead of ending the process.

    Outside meta-training (whose `StopRequests` catches the first SIGTERM and stops at the end
    of the meta-update under way) a scheduler's SIGTERM then ends the process with one line
    saying what was done and what to run, as Ctrl-C does, rather than without a word. Like
    `KeyboardInterrupt`, it acts when the TensorFlow call under way returns.
    """
    signal.signal(signal.SIGTERM, _raise_terminated)
