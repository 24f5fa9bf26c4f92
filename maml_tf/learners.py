"""Learners (the networks MAML adapts) and a normalisation layer that is twice differentiable.

Every learner here is a plain, built `keras.Model`; `maml_tf.MAML` wraps any built Keras model, so
these are conveniences that reproduce the paper's networks, not requirements.
"""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="maml_tf")
class TaskNormalization(keras.layers.Layer):
    """Normalisation with the statistics of the current batch, in training and at test time.

    Over all axes but the last: `y = gamma * (x - mean) / sqrt(var + epsilon) + beta` with
    `var = mean((x - mean)^2)`. This is what the original MAML code did (its batch norm always used
    the batch statistics, i.e. one task's support or query set: transductive at meta-test time).

    Why not `keras.layers.BatchNormalization`: on the TensorFlow backend it computes the variance
    with `tf.nn.moments`, which centres on `stop_gradient(mean)`. First derivatives are still exact,
    but second derivatives are not, so second-order MAML meta-gradients come out wrong (by 6% to
    over 100% against finite differences). Here the variance keeps its full dependence on the mean.

    It keeps no running statistics, so it has no non-trainable state.

    Args:
      epsilon: added to the variance; 1e-3 as `tf.contrib.layers.batch_norm` in the paper's code.
      center: learn the offset `beta`.
      scale: learn the scale `gamma`.
    """

    def __init__(self, epsilon=1e-3, center=True, scale=True, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon
        self.center = center
        self.scale = scale

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is None:
            raise ValueError("TaskNormalization needs a known channel (last) dimension.")
        self.gamma = (
            self.add_weight(shape=(channels,), initializer="ones", name="gamma")
            if self.scale
            else None
        )
        self.beta = (
            self.add_weight(shape=(channels,), initializer="zeros", name="beta")
            if self.center
            else None
        )

    def call(self, inputs, training=None):
        axes = list(range(len(inputs.shape) - 1))
        mean = ops.mean(inputs, axis=axes, keepdims=True)
        centred = inputs - mean
        variance = ops.mean(ops.square(centred), axis=axes, keepdims=True)
        # gamma joins the per-channel factor before it meets the activations: one product over
        # the whole tensor instead of two, which its first and second derivatives repeat.
        scale = ops.rsqrt(variance + self.epsilon)
        if self.gamma is not None:
            scale = scale * self.gamma
        outputs = centred * scale
        if self.beta is not None:
            outputs = outputs + self.beta
        return outputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"epsilon": self.epsilon, "center": self.center, "scale": self.scale})
        return config


def mlp(
    input_dim=1,
    hidden=(40, 40),
    output_dim=1,
    dtype=None,
    name="mlp",
    kernel_initializer="glorot_uniform",
):
    """The paper's sinusoid regressor: input_dim-40-40-output_dim with ReLU.

    Args:
      input_dim: features per example.
      hidden: widths of the hidden layers.
      output_dim: outputs per example.
      dtype: variable and compute dtype (None: Keras' floatx). Tests use "float64".
      name: model name.
      kernel_initializer: initialiser of the weight matrices (biases start at zero).

    Returns:
      A built `keras.Sequential`: float [batch, input_dim] -> [batch, output_dim].
    """
    layers = [keras.Input(shape=(input_dim,), dtype=dtype)]
    for i, width in enumerate(hidden):
        layers.append(
            keras.layers.Dense(
                width,
                activation="relu",
                kernel_initializer=kernel_initializer,
                dtype=dtype,
                name=f"dense{i}",
            )
        )
    layers.append(
        keras.layers.Dense(
            output_dim, kernel_initializer=kernel_initializer, dtype=dtype, name="output"
        )
    )
    return keras.Sequential(layers, name=name)


CONV4_VARIANTS = ("strided", "maxpool")


def conv4(
    n_way,
    image_shape=(28, 28, 1),
    variant="strided",
    filters=64,
    blocks=4,
    dtype=None,
    name=None,
    paper_network=False,
):
    """The paper's four-block convolutional classifier, in its two variants.

    - `strided` (the original code's Omniglot network): blocks of [3x3 conv, stride 2, "same"
      padding, TaskNormalization, ReLU], then the spatial mean, then a dense layer to n_way logits.
    - `maxpool` (the original code's miniImageNet network, and Omniglot with `--max_pool`): blocks
      of [3x3 conv, stride 1, "same", TaskNormalization, ReLU, 2x2 max-pool], then flatten, dense.
      The paper used 64 filters for Omniglot and 32 for 84x84 images.

    Args:
      n_way: number of classes (logits).
      image_shape: (height, width, channels) of one image.
      variant: "strided" or "maxpool".
      filters: filters per convolution.
      blocks: number of conv blocks (4 in the paper).
      dtype: variable and compute dtype (None: Keras' floatx).
      name: model name (default `conv4_<variant>`).
      paper_network: build it as the paper's code did: normalisation without a scale γ, and the
        output kernel drawn from N(0, 1) (a Glorot-uniform one otherwise). That code also
        learned the normalisation offsets β in the outer loop only: wrap it with
        `MAML(..., outer_only=normalization_offsets(learner))` for that.

    Returns:
      A built `keras.Sequential`: float [batch, *image_shape] -> logits [batch, n_way].
    """
    if variant not in CONV4_VARIANTS:
        raise ValueError(f"conv4 variant must be one of {CONV4_VARIANTS}, got {variant!r}")
    layers = [keras.Input(shape=tuple(image_shape), dtype=dtype)]
    for i in range(blocks):
        strides = 2 if variant == "strided" else 1
        layers += [
            # No bias: the normalisation subtracts each channel's mean, which cancels a bias
            # exactly (its gradient is zero); beta is the offset.
            keras.layers.Conv2D(
                filters,
                3,
                strides=strides,
                padding="same",
                use_bias=False,
                dtype=dtype,
                name=f"conv{i}",
            ),
            TaskNormalization(scale=not paper_network, dtype=dtype, name=f"norm{i}"),
            keras.layers.ReLU(dtype=dtype, name=f"relu{i}"),
        ]
        if variant == "maxpool":
            layers.append(
                keras.layers.MaxPooling2D(2, padding="valid", dtype=dtype, name=f"pool{i}")
            )
    if variant == "strided":
        layers.append(keras.layers.GlobalAveragePooling2D(dtype=dtype, name="spatial_mean"))
    else:
        layers.append(keras.layers.Flatten(dtype=dtype, name="flatten"))
    head_init = keras.initializers.RandomNormal(stddev=1.0) if paper_network else "glorot_uniform"
    layers.append(
        keras.layers.Dense(n_way, kernel_initializer=head_init, dtype=dtype, name="logits")
    )
    return keras.Sequential(layers, name=name or f"conv4_{variant}")


def normalization_offsets(learner):
    """The offsets β of every `TaskNormalization` in `learner`: for `MAML(outer_only=...)`."""
    return [
        layer.beta
        for layer in learner._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, TaskNormalization) and layer.beta is not None
    ]


def outer_only(learner, paper_network):
    """`MAML(outer_only=...)` for a learner built with or without `paper_network`.

    The paper's code kept its normalisation offsets out of the inner loop; our own network
    adapts every trainable variable.
    """
    return normalization_offsets(learner) if paper_network else None
