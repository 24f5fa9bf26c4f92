"""The one frozen configuration object the library reads (it never reads absl FLAGS).

Fields left as None take the paper's defaults for the chosen data set, filled in by `resolve`.
"""

import dataclasses
import json
import os

from maml_tf.errors import UserError

DATASETS = ("sinusoid", "omniglot", "folder")
MODES = ("train", "eval", "validate", "export", "tune")
TUNERS = ("random", "bayesian", "hyperband")
# Config fields that only `--mode=tune` reads.
TUNING_FIELDS = (
    "tuner",
    "max_trials",
    "tune_dir",
    "inner_lr_range",
    "outer_lr_range",
    "inner_steps_range",
    "eval_inner_steps_range",
    "tune_first_order",
    "hyperband_factor",
    "initial_points",
)
# Config fields holding a (low, high) search range, and the type of their bounds.
RANGES = {
    "inner_lr_range": float,
    "outer_lr_range": float,
    "inner_steps_range": int,
    "eval_inner_steps_range": int,
}
OMNIGLOT_SPLITS = ("maml", "lake")
# How Omniglot's 105x105 PNGs become 28x28 (`maml_tf.data.omniglot`).
RESAMPLES = ("lanczos", "nearest")
# How Omniglot's rotations augment it (`maml_tf.data.omniglot.omniglot_splits`).
ROTATIONS = ("episode", "classes", "none")
CHECKPOINTS = ("best", "final")
# The file holding a run's or pretrained model's `Config`, in its directory.
CONFIG_FILE = "config.json"
# Kept here, not imported from maml_tf.maml, so that flag parsing does not load TensorFlow.
TASK_LOOPS = ("auto", "batched", "map", "unroll")
# TF_ENABLE_ONEDNN_OPTS for each `--onednn` of main.py and the benchmark (None: left as it is,
# TensorFlow's choice). A process setting, not a Config field: TensorFlow reads it as it loads.
ONEDNN_ENV = {"default": None, "on": "1", "off": "0"}
# How logs and benchmark records name `training.onednn()`'s answer.
ONEDNN_NAMES = {True: "on", False: "off", None: "unknown"}


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run needs. Symbols as in Finn et al. (2017), Algorithm 2.

    Attributes:
      dataset: "sinusoid", "omniglot" or "folder".
      data_dir: where the data set's files are (not used by sinusoid). Omniglot without one
        comes from TFDS (which downloads it).
      split: Omniglot's class split, "maml" (1100/100/423 characters, with rotations) or
        "lake" (background / evaluation alphabets, no rotations).
      rotation: how Omniglot's rotations by 0/90/180/270 degrees augment the classes (None:
        "episode" for the maml split, "none" for the lake split): "episode", as the paper's
        code, turns each class of an episode by a random multiple of 90 degrees (classes are
        characters, never two rotations of one in an episode); "classes", as Santoro et al.
        (2016), makes every rotated character a class of its own; "none" keeps every character
        upright. Configs saved before the field existed read as what they used
        (`with_legacy_fields`).
      image_size: side of the square images (omniglot 28; folder e.g. 84 for miniImageNet).
      resample: Omniglot's resize filter: "lanczos" (grey levels) or "nearest" (binary images,
        as the paper's code made them).
      cache_dir: where decoded Omniglot arrays are cached (None: no cache).
      model_dir: where the run writes weights, logs, results and plots.
      inner_lr: α, step size of the inner SGD updates (on the mean support loss).
      outer_lr: β, Adam's learning rate for the meta-update.
      inner_steps: inner SGD steps per task in meta-training.
      eval_inner_steps: inner SGD steps at meta-test time.
      first_order: first-order MAML (no second derivatives).
      meta_batch_size: B, tasks per meta-update.
      n_way: N, classes per task (classification).
      k_shot: K, support examples per class (per task for regression).
      n_query: query examples per class (per task for regression).
      train_steps: meta-updates in all.
      steps_per_epoch: meta-updates between two validations (one Keras epoch).
      val_tasks: fixed validation tasks, evaluated after every epoch.
      test_tasks: fixed meta-test tasks.
      seed: seeds the initialisation and the training task stream.
      eval_seed: seeds the fixed validation and test tasks (keep it fixed to compare runs).
      learner: "mlp" or "conv4".
      conv_variant: "strided" or "maxpool" (conv4 only).
      filters: filters per conv4 layer.
      paper_network: conv4 as the paper's code built it: normalisation without a scale γ, its
        offsets β learned by the outer loop only, and an N(0, 1) output kernel
        (`maml_tf.learners.conv4`).
      task_loop: "auto", "batched", "map" or "unroll", see `maml_tf.MAML`.
      baseline: also train and evaluate the paper's pretrained baseline (sinusoid only; None:
        True there).
      checkpoint: which weights meta-testing uses: "best" (best validation score) or "final".
      clip_value: clip each meta-gradient element to [−clip_value, clip_value] before the
        meta-update (the paper's code used 10 for miniImageNet), or None.
      clip_norm: scale the meta-gradient down to this global norm if it is larger, or None.
      init_from: a run directory or pretrained model (`config.json` and weights): training
        starts from its θ; `--mode=eval` and `--mode=export` use it instead of `model_dir`.
      deterministic: make TensorFlow ops deterministic (same seed, same results bit for bit).
      export_dir: where `--mode=export` writes the SavedModel (None: MODEL_DIR/export, which
        training also writes at its end).
      overwrite: replace an existing export directory.
      checkpoint_every: meta-updates between two saves of the training state (None: once per
        epoch); the state is also saved at every epoch end.
      keep_checkpoints: how many of the latest training-state saves to keep.
      allow_changed: names of hyperparameters that may differ from those of the run already in
        `model_dir` when it is continued.
      verbose: Keras progress output (0 silent, 1 progress bar, 2 one line per epoch).
      inter_op_threads: TensorFlow's inter-op thread pool (ops run side by side; 0: its
        default). Speed, not the result (beyond float rounding).
      intra_op_threads: threads inside one op (0: TensorFlow's default). See README, Speed.
      tuner: `--mode=tune`'s keras-tuner search: "random", "bayesian" or "hyperband".
      max_trials: trials of the search in all (a larger value continues a finished search).
      tune_dir: where the search lives (None: MODEL_DIR/tuning).
      inner_lr_range: (low, high) of α, searched on a log scale (None: a decade either side of
        `inner_lr`; low == high fixes it).
      outer_lr_range: (low, high) of β, log scale (None: a decade either side of `outer_lr`).
      inner_steps_range: (low, high) of the meta-training inner steps (None: `inner_steps`).
      eval_inner_steps_range: (low, high) of the validation inner steps (None:
        `eval_inner_steps`).
      tune_first_order: also search first- against second-order MAML (else `first_order`).
      hyperband_factor: η of hyperband: each round keeps 1/η of the trials, trained η× longer.
      initial_points: random trials before the Gaussian process of the bayesian search (None:
        3 × the number of searched hyperparameters).
    """

    dataset: str = "sinusoid"
    data_dir: str | None = None
    split: str = "maml"
    rotation: str | None = None
    image_size: int | None = None
    resample: str = "lanczos"
    cache_dir: str | None = None
    model_dir: str = "runs/sinusoid"
    inner_lr: float | None = None
    outer_lr: float | None = None
    inner_steps: int | None = None
    eval_inner_steps: int | None = None
    first_order: bool = False
    meta_batch_size: int | None = None
    n_way: int | None = None
    k_shot: int | None = None
    n_query: int | None = None
    train_steps: int | None = None
    steps_per_epoch: int | None = None
    val_tasks: int | None = None
    test_tasks: int = 600
    seed: int = 0
    eval_seed: int = 1
    learner: str | None = None
    conv_variant: str | None = None
    filters: int | None = None
    paper_network: bool = False
    task_loop: str | None = None
    baseline: bool | None = None
    checkpoint: str = "best"
    clip_value: float | None = None
    clip_norm: float | None = None
    init_from: str | None = None
    deterministic: bool = False
    export_dir: str | None = None
    overwrite: bool = False
    checkpoint_every: int | None = None
    keep_checkpoints: int = 3
    allow_changed: tuple[str, ...] = ()
    verbose: int = 1
    inter_op_threads: int = 0
    intra_op_threads: int = 0
    tuner: str = "random"
    max_trials: int = 10
    tune_dir: str | None = None
    inner_lr_range: tuple[float, float] | None = None
    outer_lr_range: tuple[float, float] | None = None
    inner_steps_range: tuple[int, int] | None = None
    eval_inner_steps_range: tuple[int, int] | None = None
    tune_first_order: bool = False
    hyperband_factor: int = 3
    initial_points: int | None = None

    def __post_init__(self):
        # JSON and absl give lists; a frozen config holds a tuple.
        object.__setattr__(self, "allow_changed", tuple(self.allow_changed or ()))
        for name, kind in RANGES.items():
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(kind(v) for v in value))

    def resolve(self):
        """Returns a copy with every None field set to the data set's default.

        Raises:
          UserError: a field set that the data set or learner would ignore or cannot use
            (`check_applies`).
        """
        # On the fields as given: the defaults filled in below always apply to their data set.
        check_applies(self)
        defaults = DATASET_DEFAULTS[self.dataset](self)
        filled = {
            name: defaults.get(name) if getattr(self, name) is None else getattr(self, name)
            for name in (f.name for f in dataclasses.fields(self))
        }
        return Config(**filled)

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    def save(self, path):
        with open(path, "w") as f:
            f.write(self.to_json() + "\n")

    @classmethod
    def load(cls, path):
        with open(path) as f:
            values = json.load(f)
        known = {f.name for f in dataclasses.fields(cls)}
        values = with_legacy_fields(values)
        return cls(**{k: v for k, v in values.items() if k in known})

    @property
    def classification(self):
        return self.dataset != "sinusoid"

    @property
    def image_shape(self):
        """(height, width, channels) of one image: Omniglot is grayscale, folders RGB."""
        channels = 1 if self.dataset == "omniglot" else 3
        return (self.image_size, self.image_size, channels)

    @property
    def epoch_steps(self):
        """Meta-updates per Keras epoch, between two validations (of a resolved config).

        `steps_per_epoch`, but at most `train_steps`: a short run validates once, at its end.
        """
        return min(self.steps_per_epoch, self.train_steps)

    def epochs(self):
        """The Keras epochs of a resolved config's meta-training.

        Raises:
          UserError: `train_steps` is not a multiple of `epoch_steps`.
        """
        if self.train_steps % self.epoch_steps:
            raise UserError(
                f"--train_steps={self.train_steps} must be a multiple of "
                f"--steps_per_epoch={self.epoch_steps}"
            )
        return self.train_steps // self.epoch_steps

    @property
    def config_path(self):
        return os.path.join(self.model_dir, CONFIG_FILE)


def with_legacy_fields(values):
    """A saved config's field values, with what fields added since meant before they existed.

    Args:
      values: dict of a `Config` as saved (`config.json`, a search's `search.json`).

    Returns:
      A new dict: an Omniglot config of the maml split without `rotation` gets "classes", what
      runs and searches did before the field existed (rotated characters as classes); one of
      the lake split gets "none", what it always did, also in place of the "episode" that
      configs saved before "none" existed recorded for it; `baseline`, once saved as True for
      every data set, is None outside sinusoid, the only one that reads it.
    """
    values = dict(values)
    # Configs saved before only sinusoid could set it held True for every data set.
    if values.get("dataset", "sinusoid") != "sinusoid":
        values["baseline"] = None
    if values.get("dataset") == "omniglot":
        if values.get("split", "maml") == "maml":
            values.setdefault("rotation", "classes")
        elif values.get("rotation") in (None, "episode"):
            values["rotation"] = "none"
    return values


# Fields that only some data sets read, and the value a field takes when it is not set. Set to
# anything else for another data set, the field would be ignored without a word.
DATASET_FIELDS = {
    "data_dir": (("omniglot", "folder"), None),
    "split": (("omniglot",), "maml"),
    "rotation": (("omniglot",), None),
    "resample": (("omniglot",), "lanczos"),
    "cache_dir": (("omniglot",), None),
    "n_way": (("omniglot", "folder"), None),
    "image_size": (("omniglot", "folder"), None),
    "baseline": (("sinusoid",), None),
}
# The learner each data set's inputs need: sinusoid's x is a scalar, the others are images.
DATASET_LEARNERS = {"sinusoid": "mlp", "omniglot": "conv4", "folder": "conv4"}
# Fields that only conv4 reads, and their value when not set.
CONV4_FIELDS = {"conv_variant": None, "filters": None, "paper_network": False}


def _flag(name, value):
    """How `value` of the field `name` is written on the command line."""
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no{name}"
    return f"--{name}={value}"


def dataset_reads(name, dataset):
    """Whether a run on `dataset` reads the Config field `name` (`DATASET_FIELDS`)."""
    return name not in DATASET_FIELDS or dataset in DATASET_FIELDS[name][0]


def check_applies(config):
    """Refuses a field set for a data set or learner that does not read it.

    A user who writes `--dataset=folder --split=lake` or `--dataset=sinusoid --learner=conv4`
    asked for something the run would ignore or fail on deep inside Keras; the error says so in
    one line instead.

    Args:
      config: a `Config`, resolved or not.

    Raises:
      UserError: naming the flag, its value and why it does not apply.
    """
    dataset = config.dataset
    for name, (readers, unset) in DATASET_FIELDS.items():
        value = getattr(config, name)
        if not dataset_reads(name, dataset) and value != unset:
            only = " and ".join(f"--dataset={reader}" for reader in readers)
            verb = "reads" if len(readers) == 1 else "read"
            raise UserError(
                f"{_flag(name, value)}: only {only} {verb} it; this run's --dataset is {dataset}"
            )
    if dataset == "omniglot" and config.cache_dir is not None and not config.data_dir:
        raise UserError(
            f"--cache_dir={config.cache_dir}: only Omniglot read from --data_dir is cached "
            "(without --data_dir TFDS loads it, with its own cache)"
        )
    if dataset == "omniglot" and config.split == "lake" and config.rotation not in (None, "none"):
        raise UserError(
            f"--rotation={config.rotation}: --split=lake has no rotations (only --split=maml)"
        )
    learner, needed = config.learner, DATASET_LEARNERS[dataset]
    if learner is not None and learner != needed:
        inputs = "scalars" if dataset == "sinusoid" else "images"
        raise UserError(
            f"--learner={learner}: --dataset={dataset}'s inputs are {inputs}, which "
            f"--learner={needed} takes"
        )
    if (learner or needed) == "mlp":
        for name, unset in CONV4_FIELDS.items():
            value = getattr(config, name)
            if value != unset:
                raise UserError(
                    f"{_flag(name, value)}: only --learner=conv4 reads it; this run's is mlp"
                )


def _sinusoid_defaults(config):
    """Section 5.1 of the paper and its code: MLP 1-40-40-1, α 0.01, β 1e-3, B 25, K 10."""
    return {
        "inner_lr": 0.01,
        "outer_lr": 1e-3,
        "inner_steps": 1,
        "eval_inner_steps": 10,
        "meta_batch_size": 25,
        "k_shot": 10,
        "n_query": config.k_shot or 10,
        "train_steps": 70000,
        "steps_per_epoch": 1000,
        "val_tasks": 100,
        "learner": "mlp",
        "task_loop": "auto",
        "baseline": True,
    }


def _omniglot_defaults(config):
    """The paper's Omniglot settings (original code's flags, on our mean-loss convention).

    The original code's loss is the cross-entropy summed over the set and divided by K, i.e.
    N times our mean, so its α = 0.4 (5-way) and α = 0.1 (20-way) are α = 2.0 here. Its query
    sets had K examples per class, as here by default.
    """
    n_way = config.n_way or 5
    k_shot = config.k_shot or 1
    twenty_way = n_way >= 20
    return {
        "inner_lr": 2.0,
        "outer_lr": 1e-3,
        "inner_steps": 5 if twenty_way else 1,
        "eval_inner_steps": 10,
        "meta_batch_size": 16 if twenty_way else 32,
        "n_way": n_way,
        "k_shot": k_shot,
        "n_query": k_shot,
        "train_steps": 60000,
        "steps_per_epoch": 1000,
        "val_tasks": 320,
        "learner": "conv4",
        "conv_variant": "strided",
        "filters": 64,
        "image_size": 28,
        "rotation": "none" if config.split == "lake" else "episode",
        "task_loop": "auto",
    }


def _folder_defaults(config):
    """The paper's miniImageNet settings: α 0.01 on a loss N times our mean is 0.05 here."""
    return {
        "inner_lr": 0.05,
        "outer_lr": 1e-3,
        "inner_steps": 5,
        "eval_inner_steps": 10,
        "meta_batch_size": 4,
        "n_way": 5,
        "k_shot": 1,
        "n_query": 15,
        "train_steps": 60000,
        "steps_per_epoch": 1000,
        "val_tasks": 600,
        "learner": "conv4",
        "conv_variant": "maxpool",
        "filters": 32,
        "image_size": 84,
        "task_loop": "auto",
    }


DATASET_DEFAULTS = {
    "sinusoid": _sinusoid_defaults,
    "omniglot": _omniglot_defaults,
    "folder": _folder_defaults,
}
