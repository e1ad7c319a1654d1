"""The handshake checks: whether the workers that answered hello can train one model together.

Run on every worker's ``info`` before round 1, and again on each worker that
rejoins, so that a run stops with one clear line instead of failing rounds
later on a shape mismatch. Pure functions over the config and the infos:
they raise :class:`~syncfed.exceptions.IncompatibleWorkers` naming the worker
and what it should be started with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from .config import CoordinatorConfig
from .exceptions import IncompatibleWorkers, ModelError
from .models import check_model, default_model, get_weights, resolve_model
from .protocol import PROTOCOL_VERSION, Info
from .tensors import DTYPES

__all__ = [
    "check_compatible",
    "check_data",
    "check_identity",
    "check_model_available",
    "check_rejoining",
    "chosen_data",
]


def check_compatible(config: CoordinatorConfig, infos: Mapping[str, Info]) -> tuple[str, Info]:
    """The run's model name and the reference ``info`` every worker's data must match.

    Raises:
        IncompatibleWorkers: a worker is not who, or what, the config lists; workers disagree
            on their data; one cannot build the model; or the model does not fit the data.
    """
    for name, info in infos.items():
        check_identity(config, name, info)
    reference_name, reference = next(iter(infos.items()))
    for name, info in infos.items():
        check_data(name, info, reference_name, reference)
    model_name = config.model or default_model(reference.dataset)
    for name, info in infos.items():
        check_model_available(name, info, model_name)
    try:
        model = resolve_model(model_name)()
        check_model(model, reference.input_shape, reference.num_classes)
        for tensor, array in get_weights(model).items():
            if array.dtype.name not in DTYPES:
                raise ModelError(f"tensor {tensor} has dtype {array.dtype}, which the wire does not carry")
    except ModelError as exc:
        raise IncompatibleWorkers(
            f"model {model_name} does not fit the workers' {reference.dataset} data: {exc}"
        ) from None
    return model_name, reference


def check_rejoining(config: CoordinatorConfig, name: str, info: Info, reference: Info, model_name: str) -> None:
    """Check a worker that greets again mid-run as at the start, against the run's data and model.

    Raises:
        IncompatibleWorkers: as :func:`check_compatible`.
    """
    check_identity(config, name, info)
    check_data(name, info, "the others", reference)
    check_model_available(name, info, model_name)


def check_identity(config: CoordinatorConfig, name: str, info: Info) -> None:
    """The worker is the one listed as ``name``, speaks this protocol, and has the role it is listed for.

    Raises:
        IncompatibleWorkers: naming the worker and how to start it right.
    """
    role = "trainer" if name in config.workers else "evaluator"
    if info.worker_id != name:
        raise IncompatibleWorkers(f"the worker listed as {name} says it is {info.worker_id}")
    if info.protocol_version != PROTOCOL_VERSION:
        raise IncompatibleWorkers(
            f"{name} speaks protocol version {info.protocol_version}, this coordinator {PROTOCOL_VERSION}"
        )
    if info.role != role:
        hint = "started with --testing" if info.role == "evaluator" else "started without --testing"
        article = "an" if info.role == "evaluator" else "a"
        raise IncompatibleWorkers(f"{name} is {article} {info.role} ({hint}) but is listed as the {role}")
    if role == "trainer" and info.num_examples == 0:
        raise IncompatibleWorkers(f"{name} holds no training examples")


def check_data(name: str, info: Info, reference_name: str, reference: Info) -> None:
    """``name``'s data set, input shape and classes are those of ``reference_name``.

    Raises:
        IncompatibleWorkers: naming both workers and the first field that differs.
    """
    for what in ("dataset", "input_shape", "num_classes"):
        if getattr(info, what) != getattr(reference, what):
            raise IncompatibleWorkers(
                f"{name} has {what} {getattr(info, what)}, but {reference_name} has {getattr(reference, what)}"
            )


def chosen_data(config: CoordinatorConfig, name: str, info: Info) -> Info:
    """``info`` as it describes the data the run uses: the ``--dataset-key`` data set, or the worker's default.

    Raises:
        IncompatibleWorkers: the worker lacks that data set, or a trainer holds no validation
            split when federated evaluation or cross-site validation needs one.
    """
    key = config.dataset_key
    if key is not None:
        entry = next((entry for entry in info.datasets if entry.key == key), None)
        if entry is None:
            held = ", ".join(entry.key for entry in info.datasets) or "none"
            raise IncompatibleWorkers(
                f"{name} has no data set {key} (its data sets: {held}); start it with --dataset-spec {key}=..."
            )
        info = dataclasses.replace(
            info,
            dataset=entry.dataset,
            input_shape=entry.input_shape,
            num_classes=entry.num_classes,
            histogram=entry.histogram,
            max_examples=entry.max_examples,
            validation_size=entry.validation_size,
        )
    needs = "--federated-eval" if config.federated_eval else "--cross-site-validation"
    if name in config.workers and info.validation_size == 0 and (config.federated_eval or config.cross_site_validation):
        raise IncompatibleWorkers(
            f"{name} holds no validation split, which {needs} needs; start it with --val-fraction above 0"
        )
    return info


def check_model_available(name: str, info: Info, model_name: str) -> None:
    """The worker can build ``model_name``.

    Raises:
        IncompatibleWorkers: naming the models it can build and the flag that adds this one.
    """
    if model_name not in info.models:
        raise IncompatibleWorkers(
            f"{name} cannot build model {model_name} (it has {', '.join(info.models)});"
            f" start it with --model {model_name}"
        )
