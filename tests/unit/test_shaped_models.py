"""Built-in models sized from the agreed data and the recipe, the default pick, and user models given the schema."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TESTS
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from syncfed.exceptions import ModelError
from syncfed.models import DigitsCNN, describe_model, resolve_model
from syncfed.protocol.data_messages import DataPlan
from syncfed.protocol.task_messages import Recipe
from syncfed.shaped_models import (
    SHAPED_MODELS,
    ImageCNN,
    ResNet18,
    TabularMLP,
    default_shaped_model,
    shaped_factory,
)

BINARY = Recipe(task="binary", loss="bce")
REGRESSION = Recipe(task="regression", loss="mse")


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def dense_count(widths: list[int]) -> int:
    """Parameters of fully connected layers through ``widths``: a weight matrix and a bias per step."""
    return sum(a * b + b for a, b in zip(widths, widths[1:], strict=False))


def table_plan(columns: int, classes: tuple[str, ...] | None = ("no", "yes")) -> DataPlan:
    return DataPlan("table", (columns,), classes, features=tuple(f"x{i}" for i in range(columns)))


def image_plan(shape: tuple[int, int, int], classes: int = 10) -> DataPlan:
    return DataPlan("images", shape, tuple(str(c) for c in range(classes)))


def forward(model: nn.Module, shape: tuple[int, ...], batch: int = 2) -> tuple[int, ...]:
    model.eval()
    with torch.no_grad():
        return tuple(model(torch.randn(batch, *shape)).shape)


@pytest.fixture
def user_models(monkeypatch: pytest.MonkeyPatch) -> str:
    """Make tests/user_models.py importable as a user's own module would be."""
    monkeypatch.syspath_prepend(str(TESTS))
    return "user_models"


def test_the_registry_names_every_shaped_model() -> None:
    assert list(SHAPED_MODELS) == ["mlp", "cnn", "linear", "resnet18"]


@pytest.mark.parametrize("columns", [3, 300])
@pytest.mark.parametrize(
    ("recipe", "classes", "outputs"),
    [
        (None, ("a", "b", "c"), 3),
        (Recipe(), ("a", "b", "c"), 3),
        (BINARY, ("no", "yes"), 1),
        (REGRESSION, None, 1),
    ],
)
def test_mlp_and_linear_fit_any_table_with_the_recipe_s_outputs(
    columns: int, recipe: Recipe | None, classes: tuple[str, ...] | None, outputs: int
) -> None:
    plan = table_plan(columns, classes)
    mlp = shaped_factory("mlp", plan, recipe)()
    assert forward(mlp, (columns,)) == (2, outputs)
    assert parameter_count(mlp) == dense_count([columns, 64, 32, outputs])
    linear = shaped_factory("linear", plan, recipe)()
    assert forward(linear, (columns,)) == (2, outputs)
    assert parameter_count(linear) == columns * outputs + outputs


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple),
    hidden=st.lists(st.integers(1, 40), max_size=4).map(tuple),
    outputs=st.integers(1, 12),
    dropout=st.sampled_from([0.0, 0.25, 0.5]),
)
def test_mlp_layers_follow_hidden_and_dropout(
    shape: tuple[int, ...], hidden: tuple[int, ...], outputs: int, dropout: float
) -> None:
    model = TabularMLP(shape, outputs, hidden=hidden, dropout=dropout)
    widths = [math.prod(shape), *(hidden or (64, 32)), outputs]
    assert forward(model, shape) == (2, outputs)
    assert parameter_count(model) == dense_count(widths)
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [dropout] * (len(widths) - 2)


def test_dropout_is_on_in_training_and_leaves_the_tensor_names_alone() -> None:
    plan = table_plan(30)
    dropped = shaped_factory("mlp", plan, Recipe(hidden=(512,), dropout=0.5))()
    plain = shaped_factory("mlp", plan, Recipe(hidden=(512,)))()
    assert dropped.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(4, 30)
    dropped.load_state_dict(plain.state_dict())
    dropped.eval()
    plain.eval()
    assert torch.equal(dropped(x), plain(x))
    dropped.train()
    torch.manual_seed(0)
    assert not torch.equal(dropped(x), dropped(x))  # a fresh mask each pass
    plain.train()
    assert torch.equal(plain(x), plain(x))  # p = 0: the identity


@pytest.mark.parametrize(
    ("model", "kwargs", "reason"),
    [
        ("linear", {"hidden": (8,)}, "linear has no hidden layers to size, not (8,)"),
        ("linear", {"dropout": 0.5}, "linear takes no dropout, not 0.5"),
        ("resnet18", {"hidden": (8,)}, "resnet18 has no hidden layers to size, not (8,)"),
    ],
)
def test_settings_a_model_has_no_use_for_are_refused(model: str, kwargs: dict[str, object], reason: str) -> None:
    with pytest.raises(ModelError) as info:
        SHAPED_MODELS[model]((3, 8, 8), 2, **kwargs)  # type: ignore[arg-type]
    assert str(info.value) == reason


def test_cnn_over_8x8_digits_is_digits_cnn_s_layout() -> None:
    cnn = ImageCNN((1, 8, 8), 10)
    assert parameter_count(cnn) == parameter_count(DigitsCNN()) == 601_610
    shapes = [tuple(t.shape) for t in cnn.state_dict().values()]
    assert shapes == [tuple(t.shape) for t in DigitsCNN().state_dict().values()]


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (1, 28, 28), (3, 64, 64), (1, 5, 7), (2, 1, 1), (3, 8, 100)])
@pytest.mark.parametrize(("recipe", "outputs"), [(None, 4), (BINARY, 1)])
def test_cnn_fits_any_image_with_the_recipe_s_outputs(
    shape: tuple[int, int, int], recipe: Recipe | None, outputs: int
) -> None:
    classes = 4 if recipe is None else 2
    model = shaped_factory("cnn", image_plan(shape, classes), recipe)()
    assert forward(model, shape) == (2, outputs)
    # The head's input does not depend on the image's size: 128 channels pooled to 4x4, then 256 units.
    assert parameter_count(model.head) == dense_count([128 * 16, 256, outputs])


def test_cnn_head_follows_hidden_and_dropout() -> None:
    model = shaped_factory("cnn", image_plan((3, 32, 32)), Recipe(hidden=(64, 16), dropout=0.3))()
    assert parameter_count(model.head) == dense_count([128 * 16, 64, 16, 10])
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.3, 0.3]


def test_cnn_and_resnet18_refuse_a_table_in_one_line() -> None:
    for name in ("cnn", "resnet18"):
        with pytest.raises(ModelError) as info:
            shaped_factory(name, table_plan(4))()
        assert str(info.value) == f"{name} needs images of shape (channels, height, width), not (4,)"


def torchvision_resnet18_names() -> list[str]:
    """torchvision's ResNet-18 state names, written out from its layout (BasicBlock, [2, 2, 2, 2])."""

    def norm(prefix: str) -> list[str]:
        return [f"{prefix}.{n}" for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]

    names = ["conv1.weight", *norm("bn1")]
    for stage in range(1, 5):
        for block in range(2):
            at = f"layer{stage}.{block}"
            names += [f"{at}.conv1.weight", *norm(f"{at}.bn1"), f"{at}.conv2.weight", *norm(f"{at}.bn2")]
            if stage > 1 and block == 0:
                names += [f"{at}.downsample.0.weight", *norm(f"{at}.downsample.1")]
    return [*names, "fc.weight", "fc.bias"]


def test_resnet18_is_the_standard_one_with_torchvision_s_names() -> None:
    with torch.device("meta"):
        model = ResNet18((3, 224, 224), 1000)
    assert parameter_count(model) == 11_689_512
    assert list(model.state_dict()) == torchvision_resnet18_names()


def test_resnet18_takes_any_channel_count_and_the_recipe_s_outputs() -> None:
    plan = DataPlan("images", (1, 224, 224), ("normal", "pneumonia"))
    model = shaped_factory("resnet18", plan, BINARY)()
    assert forward(model, (1, 224, 224), batch=1) == (1, 1)
    # Only the stem and the head differ from the 3-channel, 1000-class model.
    assert parameter_count(model) == 11_689_512 - 64 * 2 * 7 * 7 - 999 * 513
    dropped = ResNet18((3, 32, 32), 5, dropout=0.2)
    assert forward(dropped, (3, 32, 32)) == (2, 5)
    assert dropped.dropout.p == 0.2


@pytest.mark.parametrize(
    ("plan", "model"),
    [
        (table_plan(3), "mlp"),
        (DataPlan("arrays", (4, 5), ("a", "b")), "mlp"),
        (image_plan((1, 8, 8)), "cnn"),
        (image_plan((3, 64, 40)), "cnn"),
        (image_plan((3, 65, 64)), "resnet18"),
        (image_plan((1, 224, 224)), "resnet18"),
    ],
)
def test_the_default_suits_the_data(plan: DataPlan, model: str) -> None:
    assert default_shaped_model(plan) == model


def test_without_a_recipe_a_shaped_model_has_one_output_per_class_as_before() -> None:
    plan = table_plan(5, ("a", "b"))
    assert forward(shaped_factory("mlp", plan)(), (5,)) == (2, 2)
    assert describe_model(shaped_factory("mlp", plan)) == describe_model(shaped_factory("mlp", plan, Recipe()))


def test_a_user_model_takes_the_schema(user_models: str) -> None:
    from user_models import SchemaNet  # type: ignore[import-not-found]

    plan = table_plan(7)
    model = shaped_factory(f"{user_models}:SchemaNet", plan, BINARY)()
    assert isinstance(model, SchemaNet)
    assert forward(model, (7,)) == (2, 1)
    model = resolve_model(f"{user_models}:SchemaNet", input_shape=(1, 8, 8), num_outputs=3)()
    assert forward(model, (1, 8, 8)) == (2, 3)
    # A model may take only what it needs.
    head = resolve_model(f"{user_models}:make_head", input_shape=(1, 8, 8), num_outputs=1)()
    assert forward(head, (1, 8, 8)) == (2, 1)
    assert forward(resolve_model(f"{user_models}:make_head")(), (1, 8, 8)) == (2, 10)


def test_a_user_model_without_schema_parameters_is_built_as_before(user_models: str) -> None:
    from user_models import TinyNet

    assert shaped_factory(f"{user_models}:TinyNet", image_plan((1, 8, 8)), BINARY) is TinyNet
    assert resolve_model("torch.nn:Identity", input_shape=(3,), num_outputs=2) is nn.Identity
    assert shaped_factory("digits-cnn", image_plan((1, 8, 8))) is DigitsCNN
