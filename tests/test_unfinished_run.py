"""The unfinished 20-way 5-shot run's figures, copied by hand into README.md and
docs/omniglot_runs.md each time the run goes on, are those of its committed snapshot.

A session that continues the run replaces `experiments/unfinished/omniglot_20w5s` and edits the
figures; one it forgets must fail here rather than mislead a reader.
"""

import filecmp
import os
import re

import pytest
from cli import ROOT

from maml_tf import checkpoints, plots, training

RUN = os.path.join(ROOT, "experiments", "unfinished", "omniglot_20w5s")
SHIPPED = os.path.join(ROOT, "pretrained", "omniglot_20w5s", training.FINAL_WEIGHTS)


def _read(*path):
    with open(os.path.join(ROOT, *path), encoding="utf-8") as f:
        return f.read()


def _one_save(name):
    saves = checkpoints.read_saves(os.path.join(RUN, checkpoints.CHECKPOINT_DIR, "maml", name))
    assert len(saves) == 1, f"the snapshot keeps one {name} save"
    return saves[0]


@pytest.fixture(scope="module")
def latest():
    return _one_save(checkpoints.LATEST)


@pytest.fixture(scope="module")
def best():
    return _one_save(checkpoints.BEST)


@pytest.fixture(scope="module")
def logged():
    """{meta-update: validation query accuracy} of every validation the run logged."""
    return dict(zip(*plots.read_validation_curve(RUN), strict=True))


@pytest.fixture(scope="module")
def section():
    """The 20-way 5-shot section of docs/omniglot_runs.md."""
    text = _read("docs", "omniglot_runs.md")
    start = text.index("\n## 20-way 5-shot (not reached)\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def test_the_docs_validation_table_is_every_validation_the_run_logged(section, logged):
    shown = {}
    for updates, row in re.findall(
        r"^\| updates \| (.*) \|\n\|[-|]+\|\n\| 20-way 5-shot \| (.*) \|$", section, re.M
    ):
        cells = zip(updates.split(" | "), row.split(" | "), strict=True)
        shown.update({int(step.replace(",", "")): value for step, value in cells})

    # Every logged step and no other, each to two decimals.
    assert {step: value.strip("*") for step, value in shown.items()} == {
        step: f"{100 * value:.2f}" for step, value in logged.items()
    }
    top = max(logged, key=logged.get)
    assert [step for step, value in shown.items() if value.startswith("**")] == [top]


def test_the_best_save_is_the_best_validation_and_the_shipped_model(best, logged):
    assert best.meta_updates == max(logged, key=logged.get)
    assert filecmp.cmp(os.path.join(RUN, training.BEST_WEIGHTS), SHIPPED, shallow=False)


def test_the_readme_gives_the_runs_updates_training_time_and_best_save(latest, best):
    readme = _read("README.md")
    row = re.search(r"^\| 20-way 5-shot \| 98\.9 ± 0\.2% \|.*$", readme, re.M).group(0)
    assert f"| {latest.meta_updates:,d} of 60,000; shipped θ at {best.meta_updates:,d} " in row
    times = [
        f"{save.train_seconds:,.0f} s ({save.train_seconds / 3600:.1f} h) to {save.meta_updates:,d}"
        for save in (best, latest)
    ]
    assert f"| {'; '.join(times)} |" in row
    updates = f"to {latest.meta_updates:,d} updates ({latest.train_seconds / 3600:.1f} h)"
    assert updates in " ".join(readme.split())
    assert f"{100 * best.best_score:.2f}% at {best.meta_updates:,d})" in readme
    # The shipped model's row and the example of its validation name the best save.
    assert (
        f"| `pretrained/omniglot_20w5s` | 20-way 5-shot; θ at {best.meta_updates:,d} of 60,000,"
        in readme
    )
    assert (
        f"That is the validation at {best.meta_updates:,d} updates that chose this θ "
        f"({100 * best.best_score:.2f}%;" in " ".join(readme.split())
    )


def test_the_docs_give_the_state_the_snapshot_holds(section, latest, best):
    assert (
        f"The state at {latest.meta_updates:,d} updates (and its best save, the one at "
        f"{best.meta_updates:,d}) is in" in " ".join(section.split())
    )
    last_session = re.findall(r"^\| \d+ \(\d{4}-\d\d-\d\d\) \|.*$", section, re.M)[-1]
    assert f" → {latest.meta_updates:,d} |" in last_session
    hours = latest.train_seconds / 3600
    assert last_session.endswith(
        f"; {latest.train_seconds:,.0f} s ({hours:.1f} h) at {latest.meta_updates:,d} |"
    )
