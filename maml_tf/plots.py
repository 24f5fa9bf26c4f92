"""Figures: the paper's Figure 2 for sinusoid regression."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from maml_tf.data import sinusoid  # noqa: E402


def sinusoid_fit(path, task, panels, steps=(0, 1, 10)):
    """Draws the true curve, the K support points and the fits after a few inner steps.

    Args:
      path: PNG file to write.
      task: one unbatched sinusoid task dict (`support_x`, `support_y`, `amplitude`, `phase`).
      panels: ordered mapping from a title ("MAML", "pretrained") to a `maml_tf.MAML`, each
        adapted on the task's support set.
      steps: inner step counts to draw.

    Returns:
      `path`.
    """
    x, y = sinusoid.curve(task["amplitude"], task["phase"])
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for axis, (title, model) in zip(axes[0], panels.items(), strict=True):
        axis.plot(x[:, 0], y[:, 0], color="red", lw=2, label="ground truth")
        axis.scatter(
            task["support_x"][:, 0],
            task["support_y"][:, 0],
            marker="^",
            s=60,
            color="purple",
            zorder=5,
            label=f"{len(task['support_x'])} points used for gradient",
        )
        colours = plt.cm.viridis(np.linspace(0.15, 0.85, len(steps)))
        for colour, step in zip(colours, steps, strict=True):
            weights = model.adapt(task["support_x"], task["support_y"], steps=step)
            prediction = model.forward(weights, x).numpy()
            style = ":" if step == 0 else "--"
            label = "pre-update" if step == 0 else f"{step} grad step{'s' * (step > 1)}"
            axis.plot(x[:, 0], prediction[:, 0], style, color=colour, lw=2, label=label)
        axis.set_title(title)
        axis.set_xlim(*sinusoid.INPUT_RANGE)
        axis.set_ylim(-5.5, 5.5)
        axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
