"""Meta-training and meta-testing runs: what `python main.py` does, callable from tests too."""

import collections
import json
import math
import os
import time

import keras
from absl import logging

from maml_tf import evaluation, learners, plots
from maml_tf.data.datasets import build_datasets
from maml_tf.errors import UserError
from maml_tf.maml import MAML

LEARNER_WEIGHTS = "learner.weights.h5"
BASELINE_WEIGHTS = "baseline.weights.h5"
RESULTS = "results.json"
EVAL_RESULTS = "eval_results.json"
# Step sizes tried for fine-tuning the pretrained baseline at test time; the paper tuned the
# baseline's step size automatically, here the best on the validation tasks is kept.
BASELINE_INNER_LRS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)

RunResult = collections.namedtuple(
    "RunResult",
    ["config", "test", "baseline_test", "baseline_inner_lr", "train_seconds", "figure_path"],
)
RunResult.__doc__ = """What a run measured.

Attributes:
  config: the resolved `Config`.
  test: `evaluation.EvalResult` of MAML on the fixed test tasks.
  baseline_test: the same for the pretrained baseline, or None.
  baseline_inner_lr: the baseline's fine-tuning step size chosen on the validation tasks.
  train_seconds: wall time of meta-training (None when only evaluating).
  figure_path: the sinusoid fit plot, or None.
"""


def build_learner(config):
    """The learner f_θ that a resolved config names."""
    if config.learner == "mlp":
        return learners.mlp()
    if config.learner == "conv4":
        return learners.conv4(
            config.n_way,
            image_shape=config.image_shape,
            variant=config.conv_variant,
            filters=config.filters,
        )
    raise UserError(f"--learner={config.learner}: unknown learner")


def build_model(config, learner, inner_lr=None, inner_steps=None, task_loop=None):
    """Wraps `learner` in `MAML` with the config's hyperparameters (overrides for baselines)."""
    return MAML(
        learner,
        inner_lr=config.inner_lr if inner_lr is None else inner_lr,
        inner_steps=config.inner_steps if inner_steps is None else inner_steps,
        eval_inner_steps=config.eval_inner_steps,
        first_order=config.first_order,
        loss="mse" if config.dataset == "sinusoid" else "sparse_categorical_crossentropy",
        task_loop=task_loop or config.task_loop,
    )


def _evaluator(config, model, inner_lr):
    """A view of `model`'s learner that fine-tunes with another step size (the baseline's)."""
    return build_model(config, model.learner, inner_lr=inner_lr)


def _fit(config, model, datasets, log_dir):
    steps_per_epoch = min(config.steps_per_epoch, config.train_steps)
    if config.train_steps % steps_per_epoch:
        raise UserError(
            f"--train_steps={config.train_steps} must be a multiple of "
            f"--steps_per_epoch={steps_per_epoch}"
        )
    model.compile(optimizer=keras.optimizers.Adam(config.outer_lr))
    callbacks = [keras.callbacks.TensorBoard(log_dir=log_dir, write_graph=False)]
    return model.fit(
        datasets.train,
        epochs=config.train_steps // steps_per_epoch,
        steps_per_epoch=steps_per_epoch,
        validation_data=datasets.val,
        callbacks=callbacks,
        shuffle=False,
        verbose=config.verbose,
    )


def _tune_baseline_lr(config, baseline, val):
    best = None
    for inner_lr in BASELINE_INNER_LRS:
        result = evaluation.evaluate(_evaluator(config, baseline, inner_lr), val)
        final = float(result.loss_mean[-1])
        logging.info("baseline fine-tuning α=%g: validation loss %.4f", inner_lr, final)
        if math.isfinite(final) and (best is None or final < best[1]):
            best = (inner_lr, final)
    if best is None:
        raise UserError("the pretrained baseline diverged for every fine-tuning step size")
    return best[0]


def _train_baseline(config, datasets):
    """The paper's comparison: θ pretrained on the same tasks without adaptation (k = 0)."""
    keras.utils.set_random_seed(config.seed)
    baseline = build_model(config, build_learner(config), inner_steps=0)
    _fit(config, baseline, datasets, os.path.join(config.model_dir, "logs", "baseline"))
    baseline.learner.save_weights(os.path.join(config.model_dir, BASELINE_WEIGHTS))
    inner_lr = _tune_baseline_lr(config, baseline, datasets.val)
    return _evaluator(config, baseline, inner_lr), inner_lr


def _finish(config, model, datasets, train_seconds, baseline, baseline_inner_lr, results_name):
    test = evaluation.evaluate(model, datasets.test)
    baseline_test = figure_path = None
    if baseline is not None:
        baseline_test = evaluation.evaluate(baseline, datasets.test)
    if config.dataset == "sinusoid":
        task = {k: v[0] for k, v in next(iter(datasets.test)).items()}
        panels = {"MAML": model}
        if baseline is not None:
            panels[f"pretrained, step size {baseline_inner_lr}"] = baseline
        figure_path = plots.sinusoid_fit(
            os.path.join(config.model_dir, "sinusoid_fit.png"),
            task,
            panels,
            steps=sorted({0, 1, config.eval_inner_steps}),
        )
    result = RunResult(config, test, baseline_test, baseline_inner_lr, train_seconds, figure_path)
    with open(os.path.join(config.model_dir, results_name), "w") as f:
        json.dump(
            {
                "config": json.loads(config.to_json()),
                "train_seconds": train_seconds,
                "test": evaluation.result_to_dict(test),
                "baseline_test": baseline_test and evaluation.result_to_dict(baseline_test),
                "baseline_inner_lr": baseline_inner_lr,
            },
            f,
            indent=2,
        )
    return result


def train(config):
    """Meta-trains, saves the learner's weights, then meta-tests (and the baseline, if asked).

    Writes under `config.model_dir`: `config.json`, `learner.weights.h5`, TensorBoard logs in
    `logs/`, `results.json` and, for sinusoid, `sinusoid_fit.png`.

    Args:
      config: a `Config` (resolved here).

    Returns:
      `RunResult`.
    """
    config = config.resolve()
    os.makedirs(config.model_dir, exist_ok=True)
    config.save(config.config_path)
    keras.utils.set_random_seed(config.seed)
    datasets = build_datasets(config)
    model = build_model(config, build_learner(config))
    start = time.perf_counter()
    _fit(config, model, datasets, os.path.join(config.model_dir, "logs"))
    train_seconds = time.perf_counter() - start
    model.learner.save_weights(os.path.join(config.model_dir, LEARNER_WEIGHTS))
    logging.info("meta-training took %.1f s", train_seconds)

    baseline = baseline_inner_lr = None
    if config.baseline and config.dataset == "sinusoid":
        baseline, baseline_inner_lr = _train_baseline(config, datasets)
    return _finish(config, model, datasets, train_seconds, baseline, baseline_inner_lr, RESULTS)


def evaluate(config):
    """Meta-tests the run saved in `config.model_dir` (its saved config decides the model).

    Args:
      config: a `Config`; its `model_dir` must hold a finished run. Its protocol fields
        (`test_tasks`, `eval_seed`, `eval_inner_steps`) override the saved ones when set.

    Returns:
      `RunResult` with `train_seconds` None; also written to `eval_results.json` (the training
      run's `results.json` is left as it was).
    """
    path = config.config_path
    if not os.path.exists(path):
        raise UserError(f"--model_dir={config.model_dir}: no trained run here ({path} is missing)")
    saved = config.load(path)
    overrides = {
        "test_tasks": config.test_tasks,
        "eval_seed": config.eval_seed,
        "eval_inner_steps": config.eval_inner_steps or saved.eval_inner_steps,
        "verbose": config.verbose,
    }
    saved = saved.__class__(**{**saved.__dict__, **overrides}).resolve()
    datasets = build_datasets(saved)
    model = build_model(saved, build_learner(saved))
    model.learner.load_weights(os.path.join(saved.model_dir, LEARNER_WEIGHTS))
    baseline = baseline_inner_lr = None
    results_path = os.path.join(saved.model_dir, RESULTS)
    baseline_path = os.path.join(saved.model_dir, BASELINE_WEIGHTS)
    if os.path.exists(baseline_path) and os.path.exists(results_path):
        with open(results_path) as f:
            baseline_inner_lr = json.load(f).get("baseline_inner_lr")
        if baseline_inner_lr:
            baseline = build_model(saved, build_learner(saved), baseline_inner_lr)
            baseline.learner.load_weights(baseline_path)
    return _finish(saved, model, datasets, None, baseline, baseline_inner_lr, EVAL_RESULTS)


def summary(result):
    """The text `main.py` prints at the end of a run: the adaptation table and the files."""
    config = result.config
    metric = "MSE" if config.dataset == "sinusoid" else "accuracy"
    columns = {}

    def add(title, test):
        if metric == "MSE":
            columns[title] = (test.loss_mean, test.loss_ci)
        else:
            columns[title] = (test.accuracy_mean, test.accuracy_ci)

    add(f"MAML query {metric}", result.test)
    if result.baseline_test is not None:
        add(f"pretrained (α={result.baseline_inner_lr}) {metric}", result.baseline_test)
    lines = [
        f"Meta-test on {result.test.num_tasks} fixed tasks ({config.dataset}, "
        + (
            f"K={config.k_shot}"
            if config.dataset == "sinusoid"
            else f"{config.n_way}-way {config.k_shot}-shot, {config.n_query} queries per class"
        )
        + f", α={config.inner_lr}), mean ± 95% CI after each inner step:",
        evaluation.format_table(columns),
    ]
    if result.train_seconds is not None:
        lines.append(f"meta-training: {config.train_steps} steps in {result.train_seconds:.0f} s")
    if result.figure_path:
        lines.append(f"plot: {result.figure_path}")
    lines.append(f"results: {config.model_dir}")
    return "\n".join(lines)
