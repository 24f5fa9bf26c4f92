"""Every command-line flag of maml_tf, defined in `define_flags()`, and their conversion to Config.

All flags are optional: left unset, a hyperparameter takes the paper's default for the chosen
data set (`maml_tf.config`). Library code never reads FLAGS: `main.py` calls `to_config(FLAGS)`
and passes the resulting frozen `Config` on. Symbols follow Finn et al. (2017), Algorithm 2.
"""

import os

from absl import flags

from maml_tf.config import (
    CHECKPOINTS,
    DATASETS,
    MODES,
    OMNIGLOT_SPLITS,
    ONEDNN_ENV,
    RANGES,
    RESAMPLES,
    ROTATIONS,
    TASK_LOOPS,
    TUNERS,
    TUNING_FIELDS,
    Config,
)

# Fields of Config that have a flag of the same name.
_CONFIG_FLAGS = (
    "dataset",
    "data_dir",
    "split",
    "rotation",
    "image_size",
    "resample",
    "cache_dir",
    "model_dir",
    "inner_lr",
    "outer_lr",
    "inner_steps",
    "eval_inner_steps",
    "first_order",
    "meta_batch_size",
    "n_way",
    "k_shot",
    "n_query",
    "train_steps",
    "steps_per_epoch",
    "val_tasks",
    "test_tasks",
    "seed",
    "eval_seed",
    "learner",
    "conv_variant",
    "filters",
    "paper_network",
    "task_loop",
    "baseline",
    "checkpoint",
    "clip_value",
    "clip_norm",
    "init_from",
    "deterministic",
    "export_dir",
    "overwrite",
    "checkpoint_every",
    "keep_checkpoints",
    "allow_changed",
    "verbose",
    "inter_op_threads",
    "intra_op_threads",
    *TUNING_FIELDS,
)


# Flags that one mode alone reads; given with another --mode they would be ignored without a word.
MODE_ONLY = {
    **{name: "tune" for name in TUNING_FIELDS},
    "export_dir": "export",
    "overwrite": "export",
}
# Flags that other modes read but this mode would ignore, with the reason the error gives.
IGNORED_BY = {
    ("test_tasks", "validate"): "it uses the run's own validation tasks (its val_tasks)",
    ("test_tasks", "tune"): (
        "a search meta-tests nothing (it validates its trials on --val_tasks); give it to the "
        "run trained from the search's best.flags"
    ),
    ("test_tasks", "export"): "an export meta-tests nothing",
}


def _mode_only(flag_values):
    """Refuses a flag given (on the command line or in a flagfile) for a mode that ignores it."""
    for name, reader in MODE_ONLY.items():

        def check(_, name=name, reader=reader):
            # Validators run once every flag is parsed, so --mode is known whatever its place.
            mode = flag_values["mode"].value
            if flag_values[name].present and mode != reader:
                raise flags.ValidationError(f"only --mode={reader} reads it; this is --mode={mode}")
            return True

        flags.register_validator(name, check, flag_values=flag_values)
    for (name, ignorer), reason in IGNORED_BY.items():

        def refuse(_, name=name, ignorer=ignorer, reason=reason):
            if flag_values[name].present and flag_values["mode"].value == ignorer:
                raise flags.ValidationError(f"--mode={ignorer} does not read it: {reason}")
            return True

        flags.register_validator(name, refuse, flag_values=flag_values)


def _positive(name, symbol, flag_values):
    label = f"{name} ({symbol})" if symbol else name
    flags.register_validator(
        name,
        lambda v: v is None or v > 0,
        message=f"{label} must be greater than 0",
        flag_values=flag_values,
    )


def _range(name, least, flag_values):
    """LOW,HIGH with least <= LOW <= HIGH (0 < LOW for a float range)."""
    kind = RANGES[name]

    def valid(value):
        if value is None:
            return True
        try:
            low, high = (kind(v) for v in value)
        except ValueError:
            return False
        return (low > 0 if kind is float else low >= least) and low <= high

    bound = "0 < LOW" if kind is float else f"{least} <= LOW"
    flags.register_validator(
        name,
        valid,
        message=f"{name} must be LOW,HIGH with {bound} <= HIGH",
        flag_values=flag_values,
    )


def define_flags(flag_values=flags.FLAGS):
    """Defines all maml_tf flags on `flag_values` (absl's global FLAGS by default)."""

    def define(kind, name, default, help_text, enum_values=None):
        define_flag = getattr(flags, f"DEFINE_{kind}")
        if enum_values is not None:
            define_flag(name, default, enum_values, help_text, flag_values=flag_values)
        else:
            define_flag(name, default, help_text, flag_values=flag_values)

    # What to do and where.
    define(
        "enum",
        "mode",
        "train",
        "train: meta-train, meta-test and export; eval: meta-test a saved run in --model_dir; "
        "validate: the same on the run's fixed validation tasks (those that chose its best "
        "save); "
        "export: write the run in --model_dir as a SavedModel to --export_dir; "
        "tune: search α, β, step counts (and order) with keras-tuner, writing TUNE_DIR/best.flags.",
        enum_values=list(MODES),
    )
    define(
        "enum",
        "dataset",
        "sinusoid",
        "Task distribution: sinusoid regression (nothing to "
        "download), omniglot, or folder (DIR/{train,val,test}/<class>/<image>).",
        enum_values=list(DATASETS),
    )
    define(
        "string",
        "data_dir",
        None,
        "Directory with the data set's files (omniglot: the "
        "official images_background.zip and images_evaluation.zip, zipped or extracted).",
    )
    define(
        "enum",
        "split",
        "maml",
        "Omniglot class split: maml (all 1623 characters shuffled with a fixed seed, "
        "1100/100/423 for meta-train/validation/test, rotated by 0/90/180/270 degrees, see "
        "--rotation) or lake (background alphabets for training, 5 of them held out for "
        "validation; the 20 evaluation alphabets for test; no rotations).",
        enum_values=list(OMNIGLOT_SPLITS),
    )
    define(
        "enum",
        "rotation",
        None,
        "How the maml split's rotations augment Omniglot: episode (the paper's code and "
        "learn2learn: each class of an episode is turned by a random multiple of 90 degrees; "
        "classes are the characters), classes (every rotated character is a class of its "
        "own, 4x the classes; an episode may hold two rotations of one character) or none "
        "(characters upright, the only choice for --split=lake). Default: episode for a new "
        "maml-split run, none for lake; meta-testing a saved model keeps its own unless this "
        "is set.",
        enum_values=list(ROTATIONS),
    )
    define(
        "integer",
        "image_size",
        None,
        "Side of the square images, resized once at load. Default: omniglot 28, folder 84.",
    )
    define(
        "enum",
        "resample",
        "lanczos",
        "How Omniglot's 105x105 one-bit PNGs are resized: lanczos (8-bit grey levels, then "
        "LANCZOS) or nearest (binary images, what the paper's code got from Pillow).",
        enum_values=list(RESAMPLES),
    )
    define(
        "string",
        "cache_dir",
        None,
        "Directory for a cache of the decoded Omniglot images read from --data_dir (skips 4 s "
        "of PNG decoding).",
    )
    define(
        "string",
        "model_dir",
        None,
        "Directory for weights, TensorBoard logs, results and plots. Default: runs/<dataset>.",
    )

    # The algorithm.
    define(
        "float",
        "inner_lr",
        None,
        "α, step size of the inner SGD updates θ' = θ − α∇L_support "
        "(on the mean loss). Default: sinusoid 0.01, omniglot 2.0 (the paper's 0.4 on its "
        "summed 5-way loss).",
    )
    define("float", "outer_lr", None, "β, Adam's learning rate for the meta-update. Default 1e-3.")
    define(
        "integer",
        "inner_steps",
        None,
        "k, inner SGD steps per task in meta-training. "
        "Default: 1 (sinusoid, 5-way omniglot), 5 (20-way omniglot).",
    )
    define(
        "integer",
        "eval_inner_steps",
        None,
        "Inner SGD steps at meta-test time; results are "
        "reported after each of 0..eval_inner_steps. Default 10.",
    )
    define(
        "bool",
        "first_order",
        False,
        "First-order MAML: treat the inner gradients as constants (no Hessian-vector terms).",
    )
    define(
        "integer",
        "meta_batch_size",
        None,
        "B, tasks per meta-update. Default: sinusoid 25, 5-way omniglot 32, 20-way omniglot 16.",
    )
    define(
        "float",
        "clip_value",
        None,
        "Clip each element of the meta-gradient to [-clip_value, clip_value] before the "
        "meta-update (the paper's code clipped miniImageNet gradients to [-10, 10]). Default: off.",
    )
    define(
        "float",
        "clip_norm",
        None,
        "Rescale the meta-gradient to this global norm when it is larger. Default: off.",
    )
    define("integer", "n_way", None, "N, classes per task (classification). Default 5.")
    define(
        "integer",
        "k_shot",
        None,
        "K, support examples per class (per task for sinusoid). Default: sinusoid 10, omniglot 1.",
    )
    define(
        "integer", "n_query", None, "Query examples per class (per task for sinusoid). Default: K."
    )

    # Training and evaluation.
    define(
        "integer",
        "train_steps",
        None,
        "Meta-updates in all. Default: sinusoid 70000 (the "
        "paper), omniglot 60000. A multiple of --steps_per_epoch.",
    )
    define(
        "integer",
        "steps_per_epoch",
        None,
        "Meta-updates per Keras epoch: validation, logging "
        "and the progress bar run once per epoch. Default 1000.",
    )
    define("integer", "val_tasks", None, "Fixed validation tasks evaluated after every epoch.")
    define("integer", "test_tasks", 600, "Fixed meta-test tasks (the paper: 600).")
    define("integer", "seed", 0, "Seeds the initialisation and the training task stream.")
    define("integer", "eval_seed", 1, "Seeds the fixed validation and test tasks.")
    define(
        "enum",
        "learner",
        None,
        "The network f_θ: mlp (sinusoid: 1-40-40-1 ReLU) or conv4 (images). Default by data set.",
        enum_values=["mlp", "conv4"],
    )
    define(
        "enum",
        "conv_variant",
        None,
        "conv4 form: strided (stride-2 convs, spatial mean; the "
        "paper's Omniglot net) or maxpool (2x2 max-pooling).",
        enum_values=["strided", "maxpool"],
    )
    define("integer", "filters", None, "Filters per conv4 layer. Default 64.")
    define(
        "bool",
        "paper_network",
        False,
        "conv4 as the paper's code built it: normalisation without a scale gamma, its offsets "
        "beta learned by the outer loop only (not adapted), and an N(0, 1) output kernel. "
        "Default: gamma and beta, both adapted, and a Glorot-uniform output kernel.",
    )
    define(
        "enum",
        "task_loop",
        None,
        "How the tasks of a meta-batch run in training: batched (all tasks in one pass with "
        "per-task weights: grouped convolutions, batched matmuls; the fastest), map "
        "(tf.map_fn), unroll (one graph per task), or auto (batched where the learner allows, "
        "else map). All give the same meta-gradient up to float rounding. Default by data set.",
        enum_values=list(TASK_LOOPS),
    )
    define(
        "bool",
        "baseline",
        None,
        "Sinusoid only: also train and meta-test the paper's baseline "
        "(pretrained on the same tasks without meta-learning, then fine-tuned). Default: on.",
    )
    define(
        "enum",
        "checkpoint",
        "best",
        "Weights to meta-test: best (best validation score during training) or final.",
        enum_values=list(CHECKPOINTS),
    )
    define(
        "string",
        "init_from",
        None,
        "A run directory or pretrained model (config.json plus weights, e.g. "
        "pretrained/omniglot_5w1s): training starts from its θ; with --mode=eval or "
        "--mode=export it is the model to meta-test or export (results go to --model_dir).",
    )
    define(
        "bool",
        "deterministic",
        False,
        "Deterministic TensorFlow ops: with the same --seed two runs give the same metrics and "
        "weights bit for bit (tf.config.experimental.enable_op_determinism).",
    )
    define(
        "string",
        "export_dir",
        None,
        "Where --mode=export writes the SavedModel (signatures serve and adapt_and_predict). "
        "Default: MODEL_DIR/export, which training writes too.",
    )
    define("bool", "overwrite", False, "Replace an existing --export_dir.")
    define(
        "integer",
        "checkpoint_every",
        None,
        "Meta-updates between two saves of the training state (θ, Adam's state, iteration "
        "count, best score) under MODEL_DIR/checkpoints; it is also saved at every epoch end. "
        "Running the same command again resumes from the newest save. Default: every epoch.",
    )
    define("integer", "keep_checkpoints", 3, "How many of the latest training-state saves to keep.")
    define(
        "list",
        "allow_changed",
        [],
        "Hyperparameters (flag names) that may differ from those of the run already in "
        "--model_dir when it is continued, e.g. inner_lr,outer_lr. Without it a changed "
        "hyperparameter is refused.",
    )
    define("integer", "verbose", 1, "Keras output: 0 silent, 1 progress bar, 2 one line per epoch.")
    define(
        "integer",
        "inter_op_threads",
        0,
        "TensorFlow's inter-op threads: ops (e.g. the tasks of --task_loop=map) run side by "
        "side. 0: TensorFlow's default. Changes speed (results only by float rounding); see "
        "README, Speed.",
    )
    define(
        "integer",
        "intra_op_threads",
        0,
        "Threads inside one TensorFlow op. 0: TensorFlow's default.",
    )
    define(
        "enum",
        "onednn",
        "default",
        "oneDNN kernels for TensorFlow's CPU ops: on, off, or default (TensorFlow's choice: on "
        "for processors with AVX-512, off for others, unless TF_ENABLE_ONEDNN_OPTS says "
        "otherwise). main.py sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads, which is when "
        "TensorFlow reads it. Changes speed (results only by float rounding): on an AVX2-only "
        "processor 20-way 5-shot Omniglot ran 24-32% faster with it on, 5-way 1-shot 23% "
        "slower; see README, Speed.",
        list(ONEDNN_ENV),
    )

    # Hyperparameter search (--mode=tune). Each trial trains --train_steps meta-updates in epochs
    # of --steps_per_epoch and is scored on the --val_tasks fixed validation tasks.
    define(
        "enum",
        "tuner",
        "random",
        "--mode=tune: random search, bayesian (Gaussian process) or hyperband (successive "
        "halving over epochs of --steps_per_epoch, up to --train_steps).",
        enum_values=list(TUNERS),
    )
    define(
        "integer",
        "max_trials",
        10,
        "--mode=tune: trials in all. Running the same search again continues it: finished "
        "trials are kept, so a larger value adds trials.",
    )
    define(
        "string",
        "tune_dir",
        None,
        "--mode=tune: directory of the search (keras-tuner state, TensorBoard logs, trials.md, "
        "best.flags). Default: MODEL_DIR/tuning.",
    )
    define(
        "list",
        "inner_lr_range",
        None,
        "--mode=tune: LOW,HIGH of α, searched on a log scale (LOW=HIGH fixes it). "
        "Default: a decade either side of --inner_lr.",
    )
    define(
        "list",
        "outer_lr_range",
        None,
        "--mode=tune: LOW,HIGH of β, searched on a log scale. "
        "Default: a decade either side of --outer_lr.",
    )
    define(
        "list",
        "inner_steps_range",
        None,
        "--mode=tune: LOW,HIGH of k, the inner steps in meta-training. Default: --inner_steps.",
    )
    define(
        "list",
        "eval_inner_steps_range",
        None,
        "--mode=tune: LOW,HIGH of the inner steps at validation (the score is after the last). "
        "Default: --eval_inner_steps.",
    )
    define(
        "bool",
        "tune_first_order",
        False,
        "--mode=tune: also search first- against second-order MAML (else --first_order).",
    )
    define(
        "integer",
        "hyperband_factor",
        3,
        "--tuner=hyperband: η, each round keeps 1/η of the trials and trains them η times longer.",
    )
    define(
        "integer",
        "initial_points",
        None,
        "--tuner=bayesian: random trials before the Gaussian process chooses. "
        "Default: 3 × the number of searched hyperparameters.",
    )

    for name, symbol in [
        ("inner_lr", "α"),
        ("outer_lr", "β"),
        ("inner_steps", "k"),
        ("meta_batch_size", "B"),
        ("k_shot", "K"),
        ("n_query", ""),
        ("train_steps", ""),
        ("steps_per_epoch", ""),
        ("val_tasks", ""),
        ("test_tasks", ""),
        ("filters", ""),
        ("image_size", ""),
        ("checkpoint_every", ""),
        ("clip_value", ""),
        ("clip_norm", ""),
        ("keep_checkpoints", ""),
    ]:
        _positive(name, symbol, flag_values)
    for name in ("inter_op_threads", "intra_op_threads"):
        flags.register_validator(
            name,
            lambda v: v >= 0,
            message=f"{name} must be 0 (TensorFlow's default) or a number of threads",
            flag_values=flag_values,
        )
    flags.register_validator(
        "n_way",
        lambda v: v is None or v >= 2,
        message="n_way (N) must be at least 2",
        flag_values=flag_values,
    )
    flags.register_validator(
        "eval_inner_steps",
        lambda v: v is None or v >= 0,
        message="eval_inner_steps must be 0 or more",
        flag_values=flag_values,
    )
    flags.register_validator(
        "hyperband_factor",
        lambda v: v >= 2,
        message="hyperband_factor (η) must be at least 2",
        flag_values=flag_values,
    )
    _mode_only(flag_values)
    _range("inner_lr_range", 0, flag_values)
    _range("outer_lr_range", 0, flag_values)
    _range("inner_steps_range", 1, flag_values)
    _range("eval_inner_steps_range", 0, flag_values)
    flags.register_multi_flags_validator(
        ["train_steps", "steps_per_epoch"],
        lambda f: (
            f["train_steps"] is None
            or f["steps_per_epoch"] is None
            or f["train_steps"] % f["steps_per_epoch"] == 0
        ),
        message="--train_steps must be a multiple of --steps_per_epoch",
        flag_values=flag_values,
    )


def to_config(flag_values=flags.FLAGS):
    """The frozen `Config` that the parsed flags describe (defaults not yet resolved)."""
    values = {name: flag_values[name].value for name in _CONFIG_FLAGS}
    if values["model_dir"] is None:
        if values["init_from"]:
            name = os.path.basename(os.path.normpath(values["init_from"]))
            values["model_dir"] = f"runs/eval_{name}"
        else:
            values["model_dir"] = f"runs/{values['dataset']}"
    return Config(**values)
