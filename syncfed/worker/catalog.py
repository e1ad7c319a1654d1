"""The models a worker builds: their layouts, checked before any is built, and the built ones, cached.

The demo models and those a worker was started with (``--model``) are
built without arguments, so one layout each serves every request. A worker
that holds its own data also builds the shaped models of
:mod:`syncfed.shaped_models` (``mlp``, ``cnn``, ...), and a user model that
takes the schema (``input_shape``, ``num_outputs``) is built for each
request's data plan too: such a model is sized from the plan and the
request's recipe (its output count, hidden layers, dropout), so its layouts
and built models are kept per model, plan and recipe.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any, TypeAlias

import msgpack
from torch import nn

from ..config import WorkerConfig
from ..exceptions import ConfigError, ModelError, ProtocolError, RequestFailed
from ..models import BENCH_MODELS, DEMO_MODELS, Layout, ModelFactory, describe_model, resolve_model, schema_parameters
from ..protocol import DataPlan, ModelLayout
from ..protocol.task_messages import Recipe
from ..shaped_models import SHAPED_MODELS, shaped_factory

__all__ = ["ModelKey", "ModelCatalog", "model_factories"]

#: A model as a worker caches it: its name, and the digest of the plan and recipe it was sized from ("" for none).
ModelKey: TypeAlias = tuple[str, str]


def sizing(plan: DataPlan, recipe: Recipe | None) -> str:
    """The digest a model sized from ``plan`` and ``recipe`` is cached under (its :data:`ModelKey`'s second part)."""
    if recipe is None:
        return plan.digest()
    packed = msgpack.packb(recipe.to_body(), use_bin_type=True)
    return f"{plan.digest()}-{hashlib.sha256(packed).hexdigest()[:16]}"


def model_factories(import_paths: tuple[str, ...], *, bench: bool = False) -> dict[str, ModelFactory]:
    """The demo models, the benchmark models with ``bench``, and the models this worker was started with."""
    factories = {**DEMO_MODELS, **(BENCH_MODELS if bench else {})}
    for path in import_paths:
        factories[path] = resolve_model(path)
    return factories


class ModelCatalog:
    """The models a worker serves, described once and built once each.

    Raises:
        ConfigError: if a model named at start cannot be described.
    """

    def __init__(
        self,
        config: WorkerConfig,
        *,
        shaped: bool = False,
        # Limits
        max_shaped: int = 4,
    ) -> None:
        """``shaped``: also serve the shaped models (a worker that holds its own data); ``max_shaped``: the
        (model, plan, recipe) triples whose layouts and built models are kept."""
        if max_shaped < 1:
            raise ConfigError(f"max shaped models {max_shaped} must be at least 1")
        self.factories = model_factories(config.models, bench=config.bench_models)
        self.shaped = tuple(name for name in SHAPED_MODELS if name not in self.factories) if shaped else ()
        self.max_shaped = max_shaped
        # Each model's state as names, dtypes and shapes, described without building it (see ``describe_model``):
        # a request's weights are checked against it before any model is built.
        # Sized from each request's plan and recipe: the shaped models, and user models that take the schema.
        self._sized = frozenset(
            (*self.shaped, *(name for name in config.models if schema_parameters(self.factories[name])))
        )
        self._layouts: dict[str, Layout] = {}
        for name, factory in self.factories.items():
            try:
                self._layouts[name] = describe_model(factory)
            except ModelError as exc:
                if name not in self._sized:  # one that needs the schema is described per plan
                    raise ConfigError(f"model {name}: {exc}") from None
        self._shaped_layouts: OrderedDict[ModelKey, Layout] = OrderedDict()
        self._models: dict[ModelKey, nn.Module] = {}
        self._shaped_models: OrderedDict[ModelKey, nn.Module] = OrderedDict()

    @property
    def names(self) -> tuple[str, ...]:
        """Every model this worker serves, as hello lists them."""
        return (*self.factories, *self.shaped)

    def key(self, name: str, plan: DataPlan | None, recipe: Recipe | None = None, *, hint: str = "") -> ModelKey:
        """How model ``name`` is cached for a request over ``plan`` with ``recipe``; ``hint`` ends an unknown
        model's reason.

        Raises:
            RequestFailed: ``unknown_model`` if this worker does not serve it,
                ``incompatible`` for a model sized from a plan the request lacks.
        """
        if name in self._sized and plan is not None:
            return name, sizing(plan, recipe)
        if name in self._sized and name not in self._layouts:
            raise RequestFailed("incompatible", f"model {name!r} is sized from the data plan the request lacks")
        if name not in self.factories:
            raise RequestFailed(
                "unknown_model",
                f"model {name!r} is not registered on this worker (it has {', '.join(self.names)}{hint})",
            )
        return name, ""

    def layout(self, key: ModelKey, plan: DataPlan | None, recipe: Recipe | None = None) -> Layout:
        """The layout of the model ``key`` names (from :meth:`key`), described without building it.

        Raises:
            RequestFailed: ``incompatible`` if the plan does not suit the model (a cnn over a table).
        """
        if not key[1]:
            return self._layouts[key[0]]
        layout = self._shaped_layouts.get(key)
        if layout is None:
            assert plan is not None, "a sized model's key comes with its plan"
            try:
                layout = describe_model(shaped_factory(key[0], plan, recipe))
            except ModelError as exc:
                raise RequestFailed("incompatible", f"model {key[0]!r} does not suit the data plan: {exc}") from None
            self._shaped_layouts[key] = layout
            _bound(self._shaped_layouts, self.max_shaped)
        self._shaped_layouts.move_to_end(key)
        return layout

    def describe(self, name: str, plan: DataPlan | None, recipe: Recipe | None = None) -> ModelLayout:
        """The layout of model ``name`` (sized from ``plan`` and ``recipe`` for a sized one) as the wire carries it.

        Raises:
            RequestFailed: as :meth:`key` and :meth:`layout`, or ``incompatible`` for a dtype the wire lacks.
        """
        layout = self.layout(self.key(name, plan, recipe), plan, recipe)
        try:
            return ModelLayout(name, tuple((tensor, dtype, shape) for tensor, (dtype, shape) in layout.items()))
        except ProtocolError as exc:  # e.g. a user model with a dtype the wire does not carry
            raise RequestFailed("incompatible", f"model {name!r} cannot be described on the wire: {exc}") from None

    def model(self, key: ModelKey, plan: DataPlan | None, recipe: Recipe | None = None) -> nn.Module:
        """The model ``key`` names, built on first use and then reused (its weights are set per request)."""
        if not key[1]:
            model = self._models.get(key)
            if model is None:
                model = self._models[key] = self.factories[key[0]]()
            return model
        shaped = self._shaped_models.get(key)
        if shaped is None:
            assert plan is not None, "a sized model's key comes with its plan"
            shaped = self._shaped_models[key] = shaped_factory(key[0], plan, recipe)()
            _bound(self._shaped_models, self.max_shaped)
        self._shaped_models.move_to_end(key)
        return shaped


def _bound(cache: OrderedDict[ModelKey, Any], size: int) -> None:
    """Drop the least recently used entries beyond ``size``."""
    while len(cache) > size:
        cache.popitem(last=False)
