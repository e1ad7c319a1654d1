"""Tasks: targets, losses, predictions and metric sums of each built-in task, and a user's own by import path."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from syncfed.datasets import Dataset
from syncfed.exceptions import ConfigError, DatasetError, ModelError
from syncfed.metrics import report
from syncfed.protocol.task_messages import Recipe
from syncfed.tasks import Binary, Classification, Regression, Task, make_task, resolve_task
from syncfed.training import evaluate

CPU = torch.device("cpu")


def test_no_recipe_is_the_classic_cross_entropy_bit_for_bit() -> None:
    task = make_task(None, 3)
    assert isinstance(task, Classification) and task.num_outputs == 3
    torch.manual_seed(0)
    output, labels = torch.randn(7, 3), np.array([0, 2, 1, 1, 0, 2, 2])
    target = task.targets(labels)
    assert target.dtype == torch.int64
    assert torch.equal(task.loss(output, target), F.cross_entropy(output, torch.from_numpy(labels)))
    sums = task.batch_sums(output, labels)
    assert sums["confusion"].sum() == 7 and np.trace(sums["confusion"]) == int(
        (output.argmax(1).numpy() == labels).sum()
    )


def test_class_weights_weigh_each_examples_loss_by_its_class() -> None:
    task = make_task(Recipe(class_weights=(1.0, 3.0)), 2)
    output, labels = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), np.array([0, 1, 1])
    nll = -torch.log_softmax(output, 1)[torch.arange(3), torch.from_numpy(labels)]
    weights = torch.tensor([1.0, 3.0, 3.0])
    assert torch.allclose(task.loss(output, task.targets(labels)), (weights * nll).sum() / weights.sum())


def test_binary_trains_one_logit_and_predicts_above_the_threshold() -> None:
    task = make_task(Recipe(task="binary", loss="bce", threshold=0.7), 2)
    assert isinstance(task, Binary) and task.num_outputs == 1
    logits, labels = torch.tensor([[-2.0], [0.5], [1.0], [3.0]]), np.array([0, 1, 0, 1])
    target = task.targets(labels)
    assert target.dtype == torch.float32
    p = 1 / (1 + np.exp(-logits.numpy()[:, 0].astype(np.float64)))
    expected = -np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    assert task.loss(logits, target).item() == pytest.approx(expected, rel=1e-6)
    predicted = task.predicted(logits)
    assert predicted is not None and predicted.tolist() == [0, 0, 1, 1]  # sigmoid: 0.12, 0.62, 0.73, 0.95
    sums = task.batch_sums(logits, labels)
    assert sums["confusion"].tolist() == [[1, 1], [1, 1]]
    assert sums["scores"].shape == (2, 1000) and sums["scores"][1].sum() == 2
    assert int(np.argmax(sums["scores"][1])) == int(p[1] * 1000)


def test_regression_learns_the_standardised_target_and_reports_in_its_units() -> None:
    recipe = Recipe(task="regression", loss="mse", target_mean=10.0, target_std=2.0)
    task = make_task(recipe, 1)
    labels = np.array([8.0, 10.0, 15.0], dtype=np.float32)
    target = task.targets(labels)
    assert target.tolist() == [-1.0, 0.0, 2.5]
    output = torch.tensor([[-1.0], [0.5], [2.5]])  # predictions 8, 11 and 15 days
    assert task.loss(output, target).item() == pytest.approx(0.25 / 3)
    assert task.predicted(output) is None
    sums = task.batch_sums(output, labels)["regression"]
    assert sums.tolist() == [3, 1.0, 1.0, 1.0, 33.0, 64 + 100 + 225]
    assert report({"regression": sums})["mae"] == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    ("loss", "expected"),
    [("mae", (0.5 + 2.0) / 2), ("huber", (0.5 * 0.5**2 + 1.0 * (2.0 - 0.5)) / 2)],  # huber: delta 1
)
def test_regression_losses(loss: str, expected: float) -> None:
    task = make_task(Recipe(task="regression", loss=loss), 1)
    output, labels = torch.tensor([[0.5], [-2.0]]), np.array([0.0, 0.0], dtype=np.float32)
    assert task.loss(output, task.targets(labels)).item() == pytest.approx(expected)


def test_a_recipe_that_does_not_fit_the_data_is_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match="^a binary task needs 2 classes, not 3$"):
        make_task(Recipe(task="binary", loss="bce"), 3)
    with pytest.raises(ConfigError, match="^2 class weights do not fit 3 classes$"):
        make_task(Recipe(class_weights=(1.0, 2.0)), 3)
    with pytest.raises(DatasetError, match=r"^a regression task needs a continuous label, not class labels \(int64\)$"):
        make_task(Recipe(task="regression", loss="mse"), 1).targets(np.array([1, 2]))
    with pytest.raises(DatasetError, match=r"^a binary task needs class labels, not a continuous label \(float32\)$"):
        make_task(Recipe(task="binary", loss="bce"), 2).targets(np.array([0.5], dtype=np.float32))
    with pytest.raises(
        ModelError, match=r"^model output of shape \(2, 3\) does not fit a binary task: it needs \(N, 1\)$"
    ):
        make_task(Recipe(task="binary", loss="bce"), 2).predicted(torch.zeros(2, 3))


USER_TASK = '''
import numpy as np
import torch
import torch.nn.functional as F


class Hinge:
    """A user's task: a multi-class hinge loss, and a count of examples as its own sum."""

    def __init__(self, num_classes):
        self.num_outputs = num_classes

    def targets(self, labels):
        return torch.from_numpy(labels)

    def loss(self, output, target):
        return F.multi_margin_loss(output, target)

    def predicted(self, output):
        return output.argmax(1)

    def batch_sums(self, output, labels):
        confusion = np.zeros((self.num_outputs, self.num_outputs), dtype=np.int64)
        np.add.at(confusion, (labels, self.predicted(output).numpy()), 1)
        return {"confusion": confusion, "examples": np.array([len(labels)])}


INSTANCE = Hinge(3)
NOT_A_TASK = object()
'''


@pytest.fixture
def user_tasks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "clinic_tasks.py").write_text(textwrap.dedent(USER_TASK))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "clinic_tasks"


def test_a_user_task_class_is_built_for_the_classes_and_an_object_is_taken_as_it_is(user_tasks: str) -> None:
    built = resolve_task(f"{user_tasks}:Hinge", 4)
    assert isinstance(built, Task) and built.num_outputs == 4
    assert resolve_task(f"{user_tasks}:INSTANCE", 3).num_outputs == 3


def test_a_user_task_is_imported_only_when_the_worker_was_started_with_it(user_tasks: str) -> None:
    recipe = Recipe(task=f"{user_tasks}:Hinge", loss="hinge")
    with pytest.raises(ConfigError, match="^task clinic_tasks:Hinge is not one this worker was started with"):
        make_task(recipe, 3)
    assert make_task(recipe, 3, user_tasks={f"{user_tasks}:Hinge"}).num_outputs == 3


def test_a_user_task_evaluates_with_its_own_sums(user_tasks: str) -> None:
    rng = np.random.default_rng(0)
    data = Dataset("tiny", rng.normal(size=(10, 3)).astype(np.float32), rng.integers(0, 3, 10), num_classes=3)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3)
    outcome = evaluate(model, data, 4, CPU, resolve_task(f"{user_tasks}:Hinge", 3))
    assert outcome.metrics["examples"].tolist() == [10]
    assert np.trace(outcome.metrics["confusion"]) == outcome.correct
    expected = F.multi_margin_loss(model(torch.from_numpy(data.images)), torch.from_numpy(data.labels)).item()
    assert outcome.loss == pytest.approx(expected)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("clinic_tasks.Hinge", r"^task path 'clinic_tasks.Hinge' must look like mypkg.tasks:Task$"),
        ("no_such_module_here:Task", r"^task no_such_module_here:Task cannot be imported: No module named"),
        ("clinic_tasks:Missing", r"^task clinic_tasks:Missing: module clinic_tasks has no Missing$"),
        ("clinic_tasks:NOT_A_TASK", r"^task clinic_tasks:NOT_A_TASK lacks targets, loss, predicted, batch_sums"),
        ("clinic_tasks:np", r"^task clinic_tasks:np lacks targets, loss, predicted, batch_sums"),
    ],
)
def test_a_user_task_that_is_not_one_is_refused_in_one_line(user_tasks: str, path: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_task(path, 3)


def test_a_user_task_without_a_positive_output_width_is_refused(user_tasks: str) -> None:
    with pytest.raises(ConfigError, match="^task clinic_tasks:Hinge num_outputs 0 must be a positive integer$"):
        resolve_task(f"{user_tasks}:Hinge", 0)


def test_regression_evaluation_counts_no_class_and_sums_in_the_targets_units() -> None:
    data = Dataset("stay", np.array([[1.0], [2.0], [4.0]], np.float32), np.array([3.0, 5.0, 9.0], np.float32), 1)
    model = torch.nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(0.0)
    task = Regression("mse", target_mean=1.0, target_std=2.0)  # predictions 1 + 2x: 3, 5, 9
    outcome = evaluate(model, data, 2, CPU, task)
    assert (outcome.correct, outcome.predictions, outcome.class_counts) == (0, [3], [3])
    assert report(outcome.metrics) == {"mse": 0.0, "rmse": 0.0, "mae": 0.0, "r2": 1.0}
    assert outcome.loss == 0.0


def test_binary_evaluation_reports_the_sites_exact_auc() -> None:
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 2)).astype(np.float32)
    labels = (x[:, 0] + rng.normal(size=30) > 0).astype(np.int64)
    data = Dataset("screen", x, labels, 2)
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    task = make_task(Recipe(task="binary", loss="bce"), 2)
    outcome = evaluate(model, data, 7, CPU, task)
    scores = torch.sigmoid(model(torch.from_numpy(x))[:, 0]).detach().numpy().astype(np.float64)
    assert outcome.metrics["auc"][0] == pytest.approx(roc_auc_score(labels, scores))
    assert outcome.metrics["pr_auc"][0] == pytest.approx(average_precision_score(labels, scores))
    assert outcome.metrics["scores"].sum() == 30
    assert np.trace(outcome.metrics["confusion"]) == outcome.correct
    one_class = evaluate(model, Dataset("healthy", x, np.zeros(30, np.int64), 2), 7, CPU, task)
    assert "auc" not in one_class.metrics  # undefined at a site of one class
