"""Runs `python main.py` or `python -m maml_tf.<module>` in a subprocess, as a user would."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args):
    """`python main.py *args` from the repository root; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "main.py"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )


def run_module(module, *args):
    """`python -m module *args` from the repository root; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
