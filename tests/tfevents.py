"""Reads the TensorBoard event files a run wrote, for the tests."""

import glob
import os

import tensorflow as tf
from tensorboard.plugins.hparams import plugin_data_pb2


def events(log_dir):
    """(run, step, summary value) of every summary under `log_dir`, run relative to `log_dir`."""
    pattern = os.path.join(os.fspath(log_dir), "**", "events.out.tfevents.*")
    for path in glob.glob(pattern, recursive=True):
        run = os.path.relpath(os.path.dirname(path), log_dir)
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                yield run, event.step, value


def hparams_data(value):
    """The HParams plugin's data (experiment, session start or end) in one summary value."""
    return plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
