"""All tasks of a meta-batch in one pass: a learner run with per-task weights.

`MAML` adapts B copies of θ, one per task. Looping over tasks (`tf.map_fn` or a Python loop)
runs B small convolutions where one large one would use the cores far better. Here a
`keras.Sequential` learner is re-run layer by layer with weights that carry a leading task
dimension [B, ...]:

- Dense: a batched matmul, x [B, n, d_in] · W [B, d_in, d_out].
- Conv2D: one grouped convolution, tasks folded into channels. Images are kept in the layout
  [n, H, W, B·C] (task-major channels), the kernels [B, kh, kw, C, F] become one
  [kh, kw, C, B·F] kernel, and `tf.nn.conv2d` with B·C input channels and C channels per
  filter runs B independent convolutions.
- TaskNormalization: statistics per task and channel, over (n, H, W).
- Max/average pooling and elementwise activations: unchanged, they act per channel.
- GlobalAveragePooling2D and Flatten: back to [B, n, features], flattened in Keras' (H, W, C)
  order.

Since the tasks are independent, the gradient of the summed support losses with respect to the
[B, ...] fast weights is every task's own inner gradient, so one tape serves the whole inner
step. Results equal the per-task path up to float rounding. TensorFlow has no float64 gradient
kernels for grouped convolutions on CPU, so float64 weights use one convolution per task (same
layout, same code otherwise): tests check this path in float64 against finite differences, and
the grouped convolution against it in float32. Nor, in float32, does TensorFlow's own (Eigen)
CPU kernel: only its oneDNN kernels differentiate grouped convolutions, and TensorFlow turns
oneDNN on by default only on some processors (AVX-512 ones, not AVX2-only ones).
`grouped_convolution_gradients_work` tries it once per process; where it fails, every
convolution runs per task.
"""

import functools

import keras
import tensorflow as tf

from maml_tf.learners import TaskNormalization


def mean_squared_error(y_true, y_pred):
    """Per-task MSE: [B, n, ...] -> [B]."""
    squared = tf.square(tf.cast(y_true, y_pred.dtype) - y_pred)
    return tf.reduce_mean(tf.reshape(squared, [tf.shape(squared)[0], -1]), axis=1)


def sparse_softmax_cross_entropy(y_true, logits):
    """Per-task mean cross-entropy: labels [B, n], logits [B, n, N] -> [B]."""
    losses = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(y_true, tf.int32), logits=logits
    )
    return tf.reduce_mean(losses, axis=1)


def accuracy(y_true, logits):
    """Per-task accuracy: [B, n], [B, n, N] -> [B]."""
    predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
    hits = tf.cast(tf.equal(predicted, tf.cast(y_true, tf.int32)), logits.dtype)
    return tf.reduce_mean(hits, axis=1)


# Per-task forms of the losses MAML knows by name.
LOSSES = {
    "mse": mean_squared_error,
    "sparse_categorical_crossentropy": sparse_softmax_cross_entropy,
}


def unsupported_layers(learner):
    """Names of the learner's layers this module cannot run per task ([] when it can)."""
    if not isinstance(learner, keras.Sequential):
        return [f"{learner.name} (not a keras.Sequential)"]
    bad = []
    for layer in learner.layers:
        if isinstance(layer, keras.layers.Conv2D):
            ok = (
                type(layer) is keras.layers.Conv2D
                and layer.data_format == "channels_last"
                and tuple(layer.dilation_rate) == (1, 1)
                and layer.groups == 1
                and _elementwise(layer.activation)
            )
        elif isinstance(layer, keras.layers.Dense):
            ok = type(layer) is keras.layers.Dense and _elementwise(layer.activation)
        elif isinstance(layer, TaskNormalization):
            ok = True
        elif isinstance(layer, keras.layers.MaxPooling2D | keras.layers.AveragePooling2D):
            ok = layer.data_format == "channels_last"
        elif isinstance(layer, keras.layers.GlobalAveragePooling2D):
            ok = layer.data_format == "channels_last" and not layer.keepdims
        elif isinstance(layer, keras.layers.Flatten | keras.layers.ReLU | keras.layers.InputLayer):
            ok = True
        elif isinstance(layer, keras.layers.Activation):
            ok = _elementwise(layer.activation)
        else:
            ok = False
        if not ok:
            bad.append(layer.name)
    return bad


@functools.cache
def grouped_convolution_gradients_work():
    """Whether this process's TensorFlow can differentiate a float32 grouped convolution on CPU.

    TensorFlow's Eigen kernels for `Conv2DBackpropInput` and `Conv2DBackpropFilter` reject
    feature groups ("Gradients for grouped convolutions are not supported on CPU"); its oneDNN
    kernels accept them, and oneDNN is on by default only on some processors (or with
    TF_ENABLE_ONEDNN_OPTS=1). Tried once, eagerly, on a 2-group convolution of 1x1 images: the
    two kernels are called directly, since `init_scope` (eager even while tracing) stops tapes.
    """
    # Input 1x1x2 (2 groups of 1 channel), kernel 1x1x1x2, output 1x1x2.
    common = {"strides": [1, 1, 1, 1], "padding": "VALID"}
    with tf.init_scope():
        ones = tf.ones([1, 1, 1, 2])
        try:
            tf.raw_ops.Conv2DBackpropInput(
                input_sizes=[1, 1, 1, 2], filter=ones, out_backprop=ones, **common
            )
            tf.raw_ops.Conv2DBackpropFilter(
                input=ones, filter_sizes=[1, 1, 1, 2], out_backprop=ones, **common
            )
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError):
            return False
    return True


def _has_convolutions(learner):
    return any(isinstance(layer, keras.layers.Conv2D) for layer in learner.layers)


def grouped_by_default(learner):
    """Whether this learner's convolutions run grouped by default.

    Not if it max-pools (see `BatchedLearner`), nor where grouped convolutions cannot be
    differentiated (`grouped_convolution_gradients_work`). True for a learner without
    convolutions, which has nothing to group.
    """
    if any(isinstance(layer, keras.layers.MaxPooling2D) for layer in learner.layers):
        return False
    return not _has_convolutions(learner) or grouped_convolution_gradients_work()


def _elementwise(activation):
    return getattr(activation, "__name__", "") != "softmax"


class BatchedLearner:
    """Runs a `keras.Sequential` learner on B tasks at once with per-task weights.

    Args:
      learner: a built `keras.Sequential` whose layers `unsupported_layers` accepts.
      grouped_convolutions: run a conv layer for all tasks as one grouped convolution (fast);
        False, or float64 weights, run one convolution per task in the same layout; "auto":
        grouped unless the learner max-pools (see the comment in the code). Where grouped
        convolutions cannot be differentiated (`grouped_convolution_gradients_work`), True and
        "auto" run per-task convolutions too.

    Raises:
      ValueError: the learner has layers that cannot run per task.
    """

    def __init__(self, learner, grouped_convolutions="auto"):
        if grouped_convolutions == "auto":
            # A grouped convolution rounds differently from per-task ones; max-pooling then
            # picks another maximum where two are within rounding, and the meta-gradient moves
            # by up to ~1e-3 (relative) against the per-task path. Without max-pooling the two
            # agree to ~1e-6, so only then is the faster grouped form the default.
            grouped_convolutions = grouped_by_default(learner)
        elif grouped_convolutions and _has_convolutions(learner):
            grouped_convolutions = grouped_convolution_gradients_work()
        self.grouped_convolutions = bool(grouped_convolutions)
        bad = unsupported_layers(learner)
        if bad:
            raise ValueError(f"cannot batch tasks through layers {bad}")
        self.learner = learner
        index = {id(v): i for i, v in enumerate(learner.trainable_variables)}
        # For each layer, the positions of its trainable weights in the flat weight list.
        self._slots = [[index[id(w)] for w in layer.trainable_weights] for layer in learner.layers]

    def __call__(self, weights, x):
        """The learner's outputs for each task at that task's weights.

        Args:
          weights: list aligned with `learner.trainable_variables`, each [B, *variable.shape].
          x: float [B, n, *input_shape].

        Returns:
          float [B, n, *output_shape].
        """
        batch, n = x.shape[0], tf.shape(x)[1]
        if x.shape.rank == 5:
            # [B, n, H, W, C] -> [n, H, W, B*C]: tasks folded into channels, task-major.
            h, w, c = x.shape[2:]
            x = tf.reshape(tf.transpose(x, [1, 2, 3, 0, 4]), [n, h, w, batch * c])
            images = True
        else:
            images = False
        for layer, slots in zip(self.learner.layers, self._slots, strict=True):
            params = [weights[i] for i in slots]
            x, images = self._apply(layer, params, x, images, batch)
        return x

    def _apply(self, layer, params, x, images, batch):
        if isinstance(layer, keras.layers.Conv2D):
            return layer.activation(self._conv(layer, params, x, batch)), True
        if isinstance(layer, keras.layers.Dense):
            # Not tf.einsum: TensorFlow 2.21 runs it with the oneDNN kernel MklEinsum, which
            # crashed here now and then (SIGSEGV in MKLContractOperands freeing its dnnl::stream,
            # about one process in a hundred). BatchMatMulV2 computes the same product.
            y = tf.linalg.matmul(x, params[0])
            if layer.use_bias:
                y = y + params[1][:, None, :]
            return layer.activation(y), False
        if isinstance(layer, TaskNormalization):
            return self._normalise(layer, params, x, images, batch), images
        if isinstance(layer, keras.layers.MaxPooling2D | keras.layers.AveragePooling2D):
            if isinstance(layer, keras.layers.MaxPooling2D):
                pool = tf.nn.max_pool2d
            else:
                pool = tf.nn.avg_pool2d
            return pool(x, layer.pool_size, layer.strides, layer.padding.upper()), True
        if isinstance(layer, keras.layers.GlobalAveragePooling2D):
            features = tf.reduce_mean(x, axis=[1, 2])  # [n, B*C]
            return self._tasks_first(features, batch), False
        if isinstance(layer, keras.layers.Flatten):
            if not images:
                return tf.reshape(x, [batch, tf.shape(x)[1], -1]), False
            n, h, w = tf.shape(x)[0], x.shape[1], x.shape[2]
            c = x.shape[3] // batch
            x = tf.transpose(tf.reshape(x, [n, h, w, batch, c]), [3, 0, 1, 2, 4])
            return tf.reshape(x, [batch, n, h * w * c]), False
        if isinstance(layer, keras.layers.ReLU | keras.layers.Activation):
            return layer(x), images
        return x, images  # InputLayer

    @staticmethod
    def _tasks_first(x, batch):
        """[n, B*C] -> [B, n, C]."""
        n, c = tf.shape(x)[0], x.shape[1] // batch
        return tf.transpose(tf.reshape(x, [n, batch, c]), [1, 0, 2])

    def _conv(self, layer, params, x, batch):
        kernel = params[0]  # [B, kh, kw, C, F]
        kh, kw, c, f = kernel.shape[1:]
        padding = layer.padding.upper()
        if self.grouped_convolutions and kernel.dtype != tf.float64:
            # Group g of the convolution must see task g's C channels and make its F outputs.
            kernel = tf.reshape(tf.transpose(kernel, [1, 2, 3, 0, 4]), [kh, kw, c, batch * f])
            y = tf.nn.conv2d(x, kernel, strides=layer.strides, padding=padding)
        else:
            # One convolution per task, same layout: TF has no float64 gradient kernels for
            # grouped convolutions on CPU, and this form lets tests check the rest in float64.
            inputs = tf.split(x, batch, axis=3)
            y = tf.concat(
                [
                    tf.nn.conv2d(inputs[b], kernel[b], strides=layer.strides, padding=padding)
                    for b in range(batch)
                ],
                axis=3,
            )
        if layer.use_bias:
            y = y + tf.reshape(params[1], [batch * f])
        return y

    @staticmethod
    def _normalise(layer, params, x, images, batch):
        if images:
            n, h, w = tf.shape(x)[0], x.shape[1], x.shape[2]
            c = x.shape[3] // batch
            x5 = tf.reshape(x, [n, h, w, batch, c])
            axes = [0, 1, 2]
        else:
            x5, axes = x, [1]  # [B, n, C]: statistics over the task's examples
        mean = tf.reduce_mean(x5, axis=axes, keepdims=True)
        centred = x5 - mean
        variance = tf.reduce_mean(tf.square(centred), axis=axes, keepdims=True)
        # gamma, beta: [B, C], broadcast to the layout of x. As in `TaskNormalization`, gamma
        # joins the per-channel factor so that the whole tensor is multiplied once.
        shape = [1, 1, 1, batch, -1] if images else [batch, 1, -1]
        scale = tf.math.rsqrt(variance + layer.epsilon)
        i = 0
        if layer.scale:
            scale = scale * tf.reshape(params[i], shape)
            i += 1
        y = centred * scale
        if layer.center:
            y = y + tf.reshape(params[i], shape)
        return tf.reshape(y, tf.shape(x)) if images else y
