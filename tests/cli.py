"""Runs `python main.py`, `python -m maml_tf.<module>` or a script in a fresh Python process,
from the repository root, as a user would."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*argv):
    return subprocess.run(
        [sys.executable, *map(str, argv)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )


def run_main(*args):
    """`python main.py *args`; returns the CompletedProcess."""
    return _run(os.path.join(ROOT, "main.py"), *args)


def run_module(module, *args):
    """`python -m module *args`; returns the CompletedProcess."""
    return _run("-m", module, *args)


def run_script(script):
    """`python -c script`, for what must happen before TensorFlow starts in a process."""
    return _run("-c", script)


def stderr_tail(result, chars=3000):
    """The end of a finished process's stderr, for an assertion message.

    A process that dies of a signal prints faulthandler's list of loaded extension modules last
    (absl's `app.run` turns faulthandler on), several thousand characters that would push the
    Python stack and TensorFlow's fatal log line out of a plain tail, so that line is left out.
    """
    lines = result.stderr.splitlines()
    kept = [line for line in lines if not line.startswith("Extension modules:")]
    return "\n".join(kept)[-chars:]
