"""The SavedModel export: both signatures, reloaded where only TensorFlow is imported."""

import json
import logging as std_logging
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import logging as absl_logging
from cli import ROOT, stderr_tail

from maml_tf import MAML, export, learners
from maml_tf.errors import UserError

N_WAY = 5
IMAGE_SHAPE = (28, 28, 1)

# Runs in a fresh `python -I` (no PYTHONPATH, no script directory on sys.path) from a temporary
# directory: a user's program or TensorFlow Serving has TensorFlow and the export, not maml_tf.
# It calls each signature as TF Serving does (`signatures[name](**inputs)`) and, where asked, the
# endpoint method a Python user would call (`loaded.adapt_and_predict(...)`).
LOADER = r"""
import json, os, sys
import numpy as np
import tensorflow as tf

root = sys.argv[1]
assert not any(os.path.abspath(p or ".").startswith(root) for p in sys.path), sys.path
jobs = json.load(open(sys.argv[2]))
specs = {}
for name, job in jobs.items():
    loaded = tf.saved_model.load(job["export"])
    inputs = dict(np.load(job["inputs"]))
    signature = loaded.signatures[job["signature"]]
    outputs = signature(**{k: tf.constant(v) for k, v in inputs.items()})
    np.savez(job["outputs"], **{k: v.numpy() for k, v in outputs.items()})
    if job["method"]:
        method = getattr(loaded, job["signature"])
        by_method = method(*[inputs[k] for k in job["input_order"]])
        np.savez(job["outputs"] + ".method", **{k: v.numpy() for k, v in by_method.items()})
    specs[name] = {
        "inputs": {
            k: [v.dtype.name, v.shape.as_list()]
            for k, v in signature.structured_input_signature[1].items()
        },
        "outputs": {
            k: [v.dtype.name, v.shape.as_list()] for k, v in signature.structured_outputs.items()
        },
    }
assert not [m for m in sys.modules if m.startswith("maml_tf")], "maml_tf was imported"
json.dump(specs, open(sys.argv[3], "w"))
"""


def classifier():
    learner = learners.conv4(N_WAY, image_shape=IMAGE_SHAPE, variant="strided", filters=8)
    return MAML(learner, inner_lr=0.4, eval_inner_steps=3, loss="sparse_categorical_crossentropy")


def paper_classifier():
    """The paper code's network: no γ, β learned by the outer loop only."""
    learner = learners.conv4(
        N_WAY, image_shape=IMAGE_SHAPE, variant="strided", filters=8, paper_network=True
    )
    return MAML(
        learner,
        inner_lr=0.4,
        eval_inner_steps=3,
        loss="sparse_categorical_crossentropy",
        outer_only=learners.normalization_offsets(learner),
    )


def regressor():
    return MAML(learners.mlp(hidden=(16, 16)), inner_lr=0.01, eval_inner_steps=5, loss="mse")


def classification_episode(rng, k_shot, n_query=2):
    return {
        "support_x": rng.normal(size=(N_WAY * k_shot, *IMAGE_SHAPE)).astype(np.float32),
        "support_y": np.repeat(np.arange(N_WAY, dtype=np.int32), k_shot),
        "query_x": rng.normal(size=(N_WAY * n_query, *IMAGE_SHAPE)).astype(np.float32),
    }


def sinusoid_episode(rng, k_shot, n_query=7):
    amplitude, phase = rng.uniform(0.1, 5.0), rng.uniform(0, np.pi)
    support_x = rng.uniform(-5, 5, size=(k_shot, 1)).astype(np.float32)
    return {
        "support_x": support_x,
        "support_y": (amplitude * np.sin(support_x - phase)).astype(np.float32),
        "query_x": rng.uniform(-5, 5, size=(n_query, 1)).astype(np.float32),
    }


def in_process(model, signature, inputs):
    """What the export should compute, from the model in this process."""
    if signature == export.SERVE:
        outputs = model.forward(model.theta(), inputs["x"])
    else:
        weights = model.adapt(inputs["support_x"], inputs["support_y"])
        outputs = model.forward(weights, inputs["query_x"])
    return outputs.numpy()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Exports a classifier and a regressor, then runs every call in one TF-only subprocess.

    Returns a dict: name -> (model, signature, inputs, outputs from the subprocess, outputs of
    the endpoint method or None, specs), plus "exports": the `Export` tuples.
    """
    root = tmp_path_factory.mktemp("export")
    keras.utils.set_random_seed(0)
    models = {
        "classifier": classifier(),
        "paper_classifier": paper_classifier(),
        "regressor": regressor(),
    }
    exports = {name: export.export_model(model, root / name) for name, model in models.items()}
    rng = np.random.default_rng(0)
    calls = {
        "classifier_serve": ("classifier", export.SERVE, {"x": rng.normal(size=(6, 28, 28, 1))}),
        "classifier_1_shot": (
            "classifier",
            export.ADAPT_AND_PREDICT,
            classification_episode(rng, 1),
        ),
        "classifier_3_shot": (
            "classifier",
            export.ADAPT_AND_PREDICT,
            classification_episode(rng, 3),
        ),
        "paper_classifier_2_shot": (
            "paper_classifier",
            export.ADAPT_AND_PREDICT,
            classification_episode(rng, 2),
        ),
        "regressor_serve": ("regressor", export.SERVE, {"x": rng.uniform(-5, 5, size=(9, 1))}),
        "regressor_k_5": ("regressor", export.ADAPT_AND_PREDICT, sinusoid_episode(rng, 5)),
        "regressor_k_10": ("regressor", export.ADAPT_AND_PREDICT, sinusoid_episode(rng, 10)),
    }
    jobs = {}
    for name, (model_name, signature, inputs) in calls.items():
        inputs = {
            k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in inputs.items()
        }
        calls[name] = (model_name, signature, inputs)
        np.savez(root / f"{name}.in.npz", **inputs)
        jobs[name] = {
            "export": str(root / model_name),
            "signature": signature,
            "inputs": str(root / f"{name}.in.npz"),
            "outputs": str(root / f"{name}.out.npz"),
            "method": name in ("classifier_3_shot", "regressor_serve"),
            "input_order": list(export.SIGNATURE_INPUTS[signature]),
        }
    (root / "jobs.json").write_text(json.dumps(jobs))
    (root / "loader.py").write_text(LOADER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    process = subprocess.run(
        [sys.executable, "-I", str(root / "loader.py"), ROOT, "jobs.json", "specs.json"],
        capture_output=True,
        text=True,
        cwd=root,
        env=env,
        timeout=600,
    )
    assert process.returncode == 0, stderr_tail(process)
    specs = json.loads((root / "specs.json").read_text())
    results = {"exports": exports}
    for name, (model_name, signature, inputs) in calls.items():
        method_path = root / f"{name}.out.npz.method.npz"
        results[name] = (
            models[model_name],
            signature,
            inputs,
            dict(np.load(root / f"{name}.out.npz")),
            dict(np.load(method_path)) if method_path.exists() else None,
            specs[name],
        )
    return results


def check_classification(model, signature, inputs, outputs):
    expected = in_process(model, signature, inputs)
    np.testing.assert_allclose(outputs["logits"], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        outputs["probabilities"], tf.nn.softmax(expected).numpy(), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_array_equal(outputs["labels"], expected.argmax(axis=-1))


@pytest.mark.parametrize(
    "name",
    ["classifier_serve", "classifier_1_shot", "classifier_3_shot", "paper_classifier_2_shot"],
)
def test_classifier_signatures_match_the_model_in_a_tensorflow_only_process(exported, name):
    model, signature, inputs, outputs, _, _ = exported[name]
    n = len(inputs["x" if signature == export.SERVE else "query_x"])
    assert outputs["logits"].shape == outputs["probabilities"].shape == (n, N_WAY)
    assert outputs["labels"].shape == (n,) and outputs["labels"].dtype == np.int32
    check_classification(model, signature, inputs, outputs)


@pytest.mark.parametrize("name", ["regressor_serve", "regressor_k_5", "regressor_k_10"])
def test_regressor_signatures_match_the_model_in_a_tensorflow_only_process(exported, name):
    model, signature, inputs, outputs, _, _ = exported[name]
    assert set(outputs) == {"values"}
    np.testing.assert_allclose(
        outputs["values"], in_process(model, signature, inputs), rtol=1e-5, atol=1e-5
    )


def test_adaptation_changes_the_predictions(exported):
    """adapt_and_predict really adapts: its query outputs differ from serve's on the same x."""
    model, _, inputs, outputs, _, _ = exported["regressor_k_10"]
    at_theta = in_process(model, export.SERVE, {"x": inputs["query_x"]})
    assert np.abs(outputs["values"] - at_theta).max() > 1e-3


def test_endpoint_methods_give_the_signature_outputs(exported):
    for name in ("classifier_3_shot", "regressor_serve"):
        _, _, _, outputs, by_method, _ = exported[name]
        assert set(by_method) == set(outputs)
        for key, value in outputs.items():
            np.testing.assert_allclose(by_method[key], value, rtol=1e-6, atol=1e-6)


def test_signatures_have_the_documented_names_shapes_and_dtypes(exported):
    specs = exported["classifier_1_shot"][-1]
    assert specs["inputs"] == {
        "support_x": ["float32", [None, 28, 28, 1]],
        "support_y": ["int32", [None]],
        "query_x": ["float32", [None, 28, 28, 1]],
    }
    assert specs["outputs"] == {
        "logits": ["float32", [None, N_WAY]],
        "probabilities": ["float32", [None, N_WAY]],
        "labels": ["int32", [None]],
    }
    assert exported["classifier_serve"][-1]["inputs"] == {"x": ["float32", [None, 28, 28, 1]]}
    specs = exported["regressor_k_5"][-1]
    assert specs["inputs"]["support_y"] == ["float32", [None, 1]]
    assert specs["outputs"] == {"values": ["float32", [None, 1]]}


def test_export_reports_and_records_what_it_wrote(exported):
    result = exported["exports"]["classifier"]
    assert (result.n_way, result.inner_lr, result.inner_steps) == (N_WAY, 0.4, 3)
    assert result.input_shape == IMAGE_SHAPE
    assert result.outputs == export.CLASSIFICATION_OUTPUTS
    with open(os.path.join(result.path, export.METADATA)) as f:
        metadata = json.load(f)
    assert metadata["inner_steps"] == 3 and metadata["n_way"] == N_WAY
    assert exported["exports"]["regressor"].n_way is None
    # Nothing but the exports (and the test's own files) next to them: no staging directories.
    assert not [p for p in os.listdir(os.path.dirname(result.path)) if p.startswith(".")]


def test_support_labels_outside_the_head_are_refused(exported):
    loaded = tf.saved_model.load(exported["exports"]["classifier"].path)
    episode = classification_episode(np.random.default_rng(1), 1)
    episode["support_y"][0] = N_WAY
    with pytest.raises(tf.errors.InvalidArgumentError, match="support_y must be < n_way = 5"):
        loaded.signatures[export.ADAPT_AND_PREDICT](**episode)


def test_existing_export_dir_is_refused_unless_overwrite(tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "keep.txt").write_text("previous")
    model = regressor()
    with pytest.raises(UserError, match="--export_dir=") as error:
        export.export_model(model, target)
    assert "\n" not in str(error.value)
    assert (target / "keep.txt").read_text() == "previous"

    export.export_model(model, target, overwrite=True)
    assert (target / "saved_model.pb").exists() and not (target / "keep.txt").exists()
    assert os.listdir(tmp_path) == ["export"]


def test_export_leaves_the_absl_logger_level_as_it_was(tmp_path, caplog):
    # tf.saved_model.save alone pins the absl logger at the level it inherited (WARNING here),
    # after which lowering the root logger's level no longer shows the library's INFO lines.
    absl_logger = std_logging.getLogger("absl")
    before = absl_logger.level
    absl_logger.setLevel(std_logging.NOTSET)
    try:
        export.export_model(regressor(), tmp_path / "export")
        assert absl_logger.level == std_logging.NOTSET
        with caplog.at_level(std_logging.INFO):
            absl_logging.info("after the export")
        assert "after the export" in caplog.text
    finally:
        absl_logger.setLevel(before)


def test_a_failed_export_leaves_the_previous_one_alone(tmp_path, monkeypatch):
    real_archive = keras.export.ExportArchive

    def crashing_archive():
        """An ExportArchive whose write_out dies half way through."""

        def write_out(path, **kwargs):
            with open(os.path.join(path, "saved_model.pb"), "w") as f:
                f.write("half")
            raise RuntimeError("disk full")

        archive = real_archive()
        archive.write_out = write_out
        return archive

    monkeypatch.setattr(keras.export, "ExportArchive", crashing_archive)
    target = tmp_path / "export"
    with pytest.raises(RuntimeError, match="disk full"):
        export.export_model(regressor(), target)
    assert os.listdir(tmp_path) == []

    target.mkdir()
    (target / "keep.txt").write_text("previous")
    with pytest.raises(RuntimeError, match="disk full"):
        export.export_model(regressor(), target, overwrite=True)
    assert os.listdir(tmp_path) == ["export"]
    assert os.listdir(target) == ["keep.txt"]


def test_rest_request_is_tf_serving_columnar_json():
    episode = classification_episode(np.random.default_rng(0), 1, n_query=1)
    body = json.loads(export.rest_request(export.ADAPT_AND_PREDICT, **episode))
    assert body["signature_name"] == "adapt_and_predict"
    assert set(body["inputs"]) == {"support_x", "support_y", "query_x"}
    assert np.array(body["inputs"]["support_x"]).shape == (N_WAY, 28, 28, 1)
    assert body["inputs"]["support_y"] == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(
        np.array(body["inputs"]["query_x"], np.float32), episode["query_x"]
    )
    with pytest.raises(ValueError, match="query_x"):
        export.rest_request(export.ADAPT_AND_PREDICT, support_x=[[0.0]], support_y=[[0.0]])
    with pytest.raises(ValueError, match="signature_name"):
        export.rest_request("predict", x=[[0.0]])
