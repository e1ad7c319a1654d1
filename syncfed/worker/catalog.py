"""The models a worker builds: their layouts, checked before any is built, and the built ones, cached.

The demo models and those a worker was started with (``--model``) are
built without arguments, so one layout each serves every request. A worker
that holds its own data also builds the shaped models of
:mod:`syncfed.shaped_models` (``mlp``, ``cnn``), sized from each request's
data plan: their layouts and built models are kept per model and plan.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, TypeAlias

from torch import nn

from ..config import WorkerConfig
from ..exceptions import ConfigError, ModelError, ProtocolError, RequestFailed
from ..models import Layout, describe_model
from ..protocol import DataPlan, ModelLayout
from ..shaped_models import SHAPED_MODELS, shaped_factory
from .holdings import model_factories

__all__ = ["ModelKey", "ModelCatalog"]

#: A model as a worker caches it: its name, and the digest of the plan it was sized from ("" for none).
ModelKey: TypeAlias = tuple[str, str]


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
        (model, plan) pairs whose layouts and built models are kept."""
        if max_shaped < 1:
            raise ConfigError(f"max shaped models {max_shaped} must be at least 1")
        self.factories = model_factories(config.models, bench=config.bench_models)
        self.shaped = tuple(name for name in SHAPED_MODELS if name not in self.factories) if shaped else ()
        self.max_shaped = max_shaped
        # Each model's state as names, dtypes and shapes, described without building it (see ``describe_model``):
        # a request's weights are checked against it before any model is built.
        self._layouts: dict[str, Layout] = {}
        for name, factory in self.factories.items():
            try:
                self._layouts[name] = describe_model(factory)
            except ModelError as exc:
                raise ConfigError(f"model {name}: {exc}") from None
        self._shaped_layouts: OrderedDict[ModelKey, Layout] = OrderedDict()
        self._models: dict[ModelKey, nn.Module] = {}
        self._shaped_models: OrderedDict[ModelKey, nn.Module] = OrderedDict()

    @property
    def names(self) -> tuple[str, ...]:
        """Every model this worker serves, as hello lists them."""
        return (*self.factories, *self.shaped)

    def key(self, name: str, plan: DataPlan | None, *, hint: str = "") -> ModelKey:
        """How model ``name`` is cached for a request over ``plan``; ``hint`` ends an unknown model's reason.

        Raises:
            RequestFailed: ``unknown_model`` if this worker does not serve it,
                ``incompatible`` for a shaped model without a plan to size it.
        """
        if name in self.shaped:
            if plan is None:
                raise RequestFailed("incompatible", f"model {name!r} is sized from the data plan the request lacks")
            return name, plan.digest()
        if name not in self.factories:
            raise RequestFailed(
                "unknown_model",
                f"model {name!r} is not registered on this worker (it has {', '.join(self.names)}{hint})",
            )
        return name, ""

    def layout(self, key: ModelKey, plan: DataPlan | None) -> Layout:
        """The layout of the model ``key`` names (from :meth:`key`), described without building it.

        Raises:
            RequestFailed: ``incompatible`` if the plan does not suit the model (a cnn over a table).
        """
        if not key[1]:
            return self._layouts[key[0]]
        layout = self._shaped_layouts.get(key)
        if layout is None:
            assert plan is not None, "a shaped model's key comes with its plan"
            try:
                layout = describe_model(shaped_factory(key[0], plan))
            except ModelError as exc:
                raise RequestFailed("incompatible", f"model {key[0]!r} does not suit the data plan: {exc}") from None
            self._shaped_layouts[key] = layout
            _bound(self._shaped_layouts, self.max_shaped)
        self._shaped_layouts.move_to_end(key)
        return layout

    def describe(self, name: str, plan: DataPlan | None) -> ModelLayout:
        """The layout of model ``name`` (sized from ``plan`` for a shaped one) as the wire carries it.

        Raises:
            RequestFailed: as :meth:`key` and :meth:`layout`, or ``incompatible`` for a dtype the wire lacks.
        """
        layout = self.layout(self.key(name, plan), plan)
        try:
            return ModelLayout(name, tuple((tensor, dtype, shape) for tensor, (dtype, shape) in layout.items()))
        except ProtocolError as exc:  # e.g. a user model with a dtype the wire does not carry
            raise RequestFailed("incompatible", f"model {name!r} cannot be described on the wire: {exc}") from None

    def model(self, key: ModelKey, plan: DataPlan | None) -> nn.Module:
        """The model ``key`` names, built on first use and then reused (its weights are set per request)."""
        if not key[1]:
            model = self._models.get(key)
            if model is None:
                model = self._models[key] = self.factories[key[0]]()
            return model
        shaped = self._shaped_models.get(key)
        if shaped is None:
            assert plan is not None, "a shaped model's key comes with its plan"
            shaped = self._shaped_models[key] = shaped_factory(key[0], plan)()
            _bound(self._shaped_models, self.max_shaped)
        self._shaped_models.move_to_end(key)
        return shaped


def _bound(cache: OrderedDict[ModelKey, Any], size: int) -> None:
    """Drop the least recently used entries beyond ``size``."""
    while len(cache) > size:
        cache.popitem(last=False)
