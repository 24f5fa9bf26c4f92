"""TensorBoard logs of a tiny real `fit`: every summary the run promises is in the event files."""

import collections
import re
import tracemalloc
import types

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import api_pb2
from tfevents import events, hparams_data

from maml_tf import MAML, learners, monitoring
from maml_tf.config import Config
from maml_tf.data import episodes, sinusoid

EPOCHS = 2
EVAL_STEPS = 2

# What one event file holds: run -> tag -> {step: summary value} and tag -> plugin name.
Logs = collections.namedtuple("Logs", ["values", "plugins"])


def read_logs(log_dir):
    """Every summary under `log_dir`, keyed by run, tag and step (the last value per step)."""
    values = collections.defaultdict(lambda: collections.defaultdict(dict))
    plugins = {}
    for run, step, value in events(log_dir):
        values[run][value.tag][step] = value
        if value.metadata.plugin_data.plugin_name:
            plugins[value.tag] = value.metadata.plugin_data.plugin_name
    return Logs(values, plugins)


def fit_with_monitoring(config, model, train, val, log_dir):
    """What `training._fit` does, with the monitoring callbacks wired in."""
    model.compile(optimizer=keras.optimizers.Adam(config.outer_lr))
    callbacks = [
        monitoring.EpochTensorBoard(log_dir=log_dir, write_graph=False),
        *monitoring.monitoring_callbacks(config, types.SimpleNamespace(val=val), log_dir),
    ]
    model.fit(
        train,
        epochs=EPOCHS,
        steps_per_epoch=config.steps_per_epoch,
        validation_data=val,
        callbacks=callbacks,
        shuffle=False,
        verbose=0,
    )
    return read_logs(log_dir)


def tiny_config(tmp_path, **kwargs):
    return Config(
        model_dir=str(tmp_path),
        meta_batch_size=2,
        k_shot=1,
        n_query=2,
        inner_steps=1,
        eval_inner_steps=EVAL_STEPS,
        train_steps=2 * EPOCHS,
        steps_per_epoch=2,
        val_tasks=2,
        **kwargs,
    ).resolve()


@pytest.fixture(scope="module")
def sinusoid_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("sinusoid")
    config = tiny_config(tmp_path, dataset="sinusoid", outer_lr=0.002)
    keras.utils.set_random_seed(0)
    model = MAML(learners.mlp(hidden=(8, 8)), inner_lr=config.inner_lr, eval_inner_steps=EVAL_STEPS)

    def tasks(split, num_tasks):
        return sinusoid.task_dataset(
            config.k_shot, config.n_query, config.meta_batch_size, 0, split, num_tasks
        )

    logs = fit_with_monitoring(config, model, tasks("train", None), tasks("val", 2), tmp_path)
    return config, logs


@pytest.fixture(scope="module")
def classification_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("classification")
    config = tiny_config(tmp_path, dataset="omniglot", n_way=3, filters=4)
    images = np.random.default_rng(0).integers(0, 256, (6, 4, 28, 28, 1), dtype=np.uint8)
    keras.utils.set_random_seed(0)
    learner = learners.conv4(config.n_way, image_shape=(28, 28, 1), variant="strided", filters=4)
    model = MAML(
        learner,
        inner_lr=config.inner_lr,
        eval_inner_steps=EVAL_STEPS,
        loss="sparse_categorical_crossentropy",
    )

    def tasks(num_tasks):
        return episodes.episode_dataset(
            images, config.n_way, config.k_shot, config.n_query, 2, 0, num_tasks=num_tasks
        )

    logs = fit_with_monitoring(config, model, tasks(None), tasks(2), tmp_path)
    return config, logs


def session_start(logs):
    """The hparams session start of the run written in the log directory itself."""
    return hparams_data(logs.values["."]["_hparams_/session_start_info"][0]).session_start_info


def experiment(logs):
    return hparams_data(logs.values["."]["_hparams_/experiment"][0]).experiment


def test_train_run_has_query_loss_support_loss_and_accuracy_per_epoch(classification_run):
    _, logs = classification_run
    for tag in ("epoch_query_loss", "epoch_support_loss", "epoch_query_accuracy"):
        assert set(logs.values["train"][tag]) == set(range(EPOCHS)), tag


def test_sinusoid_train_run_has_query_and_support_loss(sinusoid_run):
    _, logs = sinusoid_run
    assert {"epoch_query_loss", "epoch_support_loss"} <= set(logs.values["train"])


def test_learning_rate_is_logged_as_epoch_learning_rate(sinusoid_run):
    config, logs = sinusoid_run
    for value in logs.values["train"]["epoch_learning_rate"].values():
        assert tf.make_ndarray(value.tensor) == pytest.approx(config.outer_lr)


def test_validation_run_has_every_inner_step(classification_run):
    _, logs = classification_run
    expected = {"epoch_query_loss", "epoch_query_accuracy", "epoch_support_loss"}
    for i in range(EVAL_STEPS + 1):
        expected |= {f"epoch_query_loss_step_{i}", f"epoch_query_accuracy_step_{i}"}
    assert expected <= set(logs.values["validation"])


def test_hparams_session_holds_the_config(classification_run):
    config, logs = classification_run
    hparams = session_start(logs).hparams
    assert hparams["inner_lr"].number_value == pytest.approx(config.inner_lr)
    assert hparams["outer_lr"].number_value == pytest.approx(config.outer_lr)
    assert hparams["first_order"].bool_value == config.first_order
    assert hparams["dataset"].string_value == "omniglot"
    for name in ("inner_steps", "eval_inner_steps", "meta_batch_size", "n_way", "k_shot", "seed"):
        assert hparams[name].number_value == getattr(config, name), name


def test_hparams_metrics_are_logged_where_the_experiment_says(classification_run):
    _, logs = classification_run
    metrics = experiment(logs).metric_infos
    assert {(m.name.group, m.name.tag) for m in metrics} >= {
        ("validation", "epoch_query_accuracy"),
        ("validation", "epoch_query_loss"),
    }
    for metric in metrics:
        assert metric.name.tag in logs.values[metric.name.group], metric


def test_hparams_session_ends_with_success(sinusoid_run):
    _, logs = sinusoid_run
    end = hparams_data(logs.values["."]["_hparams_/session_end_info"][0]).session_end_info
    assert end.status == api_pb2.STATUS_SUCCESS


def test_inner_step_layout_matches_the_validation_tags(classification_run):
    _, logs = classification_run
    value = logs.values["."]["custom_scalars__config__"][0]
    layout = layout_pb2.Layout.FromString(tf.make_ndarray(value.tensor).item())
    charts = [chart for category in layout.category for chart in category.chart]
    assert len(charts) == 2
    for chart in charts:
        (regex,) = chart.multiline.tag
        matched = [tag for tag in logs.values["validation"] if re.search(regex, tag)]
        assert len(matched) == EVAL_STEPS + 1, regex


def test_episode_images_are_written_once_at_train_begin(classification_run):
    _, logs = classification_run
    for tag in monitoring.EPISODE_TAGS.values():
        assert logs.plugins[tag] == "images"
        (step,) = logs.values["."][tag]
        assert step == 0


def test_episode_image_is_a_png_with_one_column_per_label(classification_run):
    _, logs = classification_run
    value = logs.values["."][monitoring.EPISODE_TAGS["query"]][0]
    width, height, png = tf.make_ndarray(value.tensor)
    image = tf.io.decode_png(png).numpy()
    assert image.shape[:2] == (int(height), int(width))
    # n_way = 3 columns of n_query = 2 images: wider than tall.
    assert int(width) > int(height) > 0


def test_sinusoid_fit_is_written_every_epoch(sinusoid_run):
    _, logs = sinusoid_run
    assert logs.plugins[monitoring.SINUSOID_FIT_TAG] == "images"
    assert set(logs.values["."][monitoring.SINUSOID_FIT_TAG]) == set(range(EPOCHS))


def test_each_task_type_gets_only_its_own_images(sinusoid_run, classification_run):
    assert monitoring.SINUSOID_FIT_TAG not in classification_run[1].values["."]
    for tag in monitoring.EPISODE_TAGS.values():
        assert tag not in sinusoid_run[1].values["."]


def test_run_hparams_reports_the_models_inner_loop():
    config = Config(dataset="sinusoid").resolve()
    baseline = MAML(learners.mlp(hidden=(4,)), inner_lr=0.05, inner_steps=0, eval_inner_steps=3)
    hparams = monitoring.run_hparams(config, baseline)
    assert (hparams["inner_steps"], hparams["inner_lr"], hparams["eval_inner_steps"]) == (
        0,
        0.05,
        3,
    )
    assert "n_way" not in hparams and "split" not in hparams and "rotation" not in hparams


def test_run_hparams_name_omniglots_rotation():
    config = Config(dataset="omniglot", rotation="classes").resolve()
    assert monitoring.run_hparams(config)["rotation"] == "classes"
    assert monitoring.run_hparams(Config(dataset="omniglot").resolve())["rotation"] == "episode"


_WRITTEN_ONCE = [
    "_hparams_/experiment",
    "_hparams_/session_start_info",
    "custom_scalars__config__",
    *monitoring.EPISODE_TAGS.values(),
]


def _three_way_val():
    images = np.random.default_rng(0).integers(0, 256, (4, 3, 28, 28, 1), dtype=np.uint8)
    return types.SimpleNamespace(val=episodes.episode_dataset(images, 3, 1, 2, 1, 0, 1))


def _train_begin_and_end(callbacks):
    """What one `fit` calls on the monitoring callbacks."""
    model = MAML(learners.mlp(hidden=(4,)), inner_lr=0.1)
    for callback in callbacks:
        callback.set_model(model)
        callback.on_train_begin()
        callback.on_train_end()


def test_a_run_of_several_fits_describes_itself_once(tmp_path):
    config = tiny_config(tmp_path, dataset="omniglot", n_way=3)
    callbacks = monitoring.monitoring_callbacks(config, _three_way_val(), tmp_path)
    for _ in range(2):
        _train_begin_and_end(callbacks)
    counts = collections.Counter(value.tag for _, _, value in events(tmp_path))
    assert [counts[tag] for tag in _WRITTEN_ONCE] == [1] * 5


def test_a_resumed_run_does_not_describe_itself_again(tmp_path):
    config = tiny_config(tmp_path, dataset="omniglot", n_way=3)
    datasets = _three_way_val()
    for resumed in (False, True):  # the run's first process, then the one that resumes it
        _train_begin_and_end(
            monitoring.monitoring_callbacks(config, datasets, tmp_path, resumed=resumed)
        )
    counts = collections.Counter(value.tag for _, _, value in events(tmp_path))
    assert [counts[tag] for tag in _WRITTEN_ONCE] == [1] * 5
    # Each process still closes the HParams session it ran.
    assert counts["_hparams_/session_end_info"] == 2


def test_a_resumed_classification_run_does_not_sample_its_episode_again(tmp_path):
    # Its log directory has the episode images, so the validation pipeline is not read:
    # datasets without `val` would raise AttributeError if it were.
    config = tiny_config(tmp_path, dataset="omniglot", n_way=3)
    callbacks = monitoring.monitoring_callbacks(
        config, types.SimpleNamespace(), tmp_path, resumed=True
    )
    assert not any(isinstance(c, monitoring.EpisodeImages) for c in callbacks)


def _bytes_kept_per_batch(callback_class, tmp_path, batches=3000):
    """Python memory a TensorBoard callback keeps per training batch, after a warm-up."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    callback = callback_class(log_dir=str(tmp_path), write_graph=False)
    callback.set_model(model)
    callback.on_train_begin()
    rng = np.random.default_rng(0)

    def run(first, count):
        for batch in range(first, first + count):
            callback.on_train_batch_begin(batch)
            # Distinct values, as a training run's losses are.
            logs = {"query_loss": float(rng.random()), "support_loss": float(rng.random())}
            callback.on_train_batch_end(batch, logs)

    run(0, 200)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        run(200, batches)
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    callback.on_train_end()
    return kept / batches


def test_the_epoch_tensorboard_callback_keeps_no_memory_per_batch(tmp_path):
    assert _bytes_kept_per_batch(monitoring.EpochTensorBoard, tmp_path) < 1.0


def test_keras_tensorboard_still_keeps_memory_per_batch(tmp_path):
    # Why EpochTensorBoard exists. If this fails after a Keras or TensorFlow upgrade, the leak is
    # fixed upstream: use keras.callbacks.TensorBoard again and delete EpochTensorBoard.
    assert _bytes_kept_per_batch(keras.callbacks.TensorBoard, tmp_path) > 20.0


def test_the_epoch_tensorboard_callback_refuses_batch_summaries(tmp_path):
    with pytest.raises(ValueError, match="per epoch only"):
        monitoring.EpochTensorBoard(log_dir=str(tmp_path), update_freq=100)


class EpochTagsOnDisk(keras.callbacks.Callback):
    """Records, at each epoch end, the epoch_* tags and steps already in the event files."""

    def __init__(self, log_dir):
        super().__init__()
        self.log_dir = log_dir
        self.seen = []

    def on_epoch_end(self, epoch, logs=None):
        self.seen.append(
            {
                (run, value.tag, step)
                for run, step, value in events(self.log_dir)
                if value.tag.startswith("epoch_")
            }
        )


def test_an_epochs_scalars_are_on_disk_at_its_end(tmp_path):
    # A process killed later (SIGKILL, a lost machine) must not take the epoch's curve with it.
    keras.utils.set_random_seed(0)
    model = MAML(learners.mlp(hidden=(4,)), inner_lr=0.01)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    tasks = sinusoid.task_dataset(1, 2, 2, 0, "train", None)
    probe = EpochTagsOnDisk(tmp_path)
    model.fit(
        tasks,
        epochs=2,
        steps_per_epoch=2,
        validation_data=sinusoid.task_dataset(1, 2, 2, 0, "val", 2),
        callbacks=[monitoring.EpochTensorBoard(log_dir=tmp_path, write_graph=False), probe],
        shuffle=False,
        verbose=0,
    )
    for epoch, seen in enumerate(probe.seen):
        for run, tag in [("train", "epoch_query_loss"), ("validation", "epoch_query_loss")]:
            assert (run, tag, epoch) in seen, (epoch, sorted(seen))
