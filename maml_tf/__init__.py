"""maml_tf: Model-Agnostic Meta-Learning in TensorFlow 2 and Keras 3."""

from maml_tf import learners
from maml_tf.maml import MAML, TaskResults

__all__ = ["MAML", "TaskResults", "learners"]
__version__ = "0.1.0"
