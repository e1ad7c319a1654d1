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
from .data.agreement import agree
from .exceptions import IncompatibleWorkers, ModelError, ProtocolError
from .protocol import LOSSES, PROTOCOL_VERSION, TASK_KINDS, DataPlan, DataSchema, Info, Recipe
from .tensors import DTYPES

__all__ = [
    "agreed_plan",
    "check_compatible",
    "check_data",
    "check_fits_plan",
    "check_identity",
    "check_model_available",
    "check_rejoining",
    "chosen_data",
    "chosen_recipe",
    "decided_task",
]


def check_compatible(
    config: CoordinatorConfig, infos: Mapping[str, Info]
) -> tuple[str, Info, DataPlan | None, Recipe | None]:
    """The run's model name, the reference ``info`` every worker's data must match, over a user's own
    data the plan the workers' schemas agree on (without standardisation; see ``syncfed.data.agreement``),
    and the run's recipe (:func:`chosen_recipe`; its class weights and target statistics come later).

    Raises:
        IncompatibleWorkers: a worker is not who, or what, the config lists; workers disagree
            on their data; one cannot build the model; or the model does not fit the data.
    """
    # Imported here: the models load torch, which the other checks (a query round's among them) never need.
    from .models import check_model, default_model, get_weights, resolve_model
    from .shaped_models import default_shaped_model, shaped_factory

    for name, info in infos.items():
        check_identity(config, name, info)
    reference_name, reference = next(iter(infos.items()))
    plan = agreed_plan(infos, evaluator=next(iter(config.evaluator), None))
    if plan is None:
        for name, info in infos.items():
            check_data(name, info, reference_name, reference)
        model_name = config.model or default_model(reference.dataset)
        input_shape, num_classes, what = reference.input_shape, reference.num_classes, reference.dataset
    else:
        model_name = config.model or default_shaped_model(plan)
        input_shape, num_classes, what = plan.input_shape, plan.num_classes, f"own {plan.kind}"
    recipe = chosen_recipe(config, plan, reference.num_classes)
    for name, info in infos.items():
        check_model_available(name, info, model_name)
    try:
        model = shaped_factory(model_name, plan, recipe)() if plan is not None else resolve_model(model_name)()
        check_model(model, input_shape, num_classes if recipe is None else recipe.num_outputs(num_classes))
        for tensor, array in get_weights(model).items():
            if array.dtype.name not in DTYPES:
                raise ModelError(f"tensor {tensor} has dtype {array.dtype}, which the wire does not carry")
    except ModelError as exc:
        raise IncompatibleWorkers(f"model {model_name} does not fit the workers' {what} data: {exc}") from None
    return model_name, reference, plan, recipe


def decided_task(task: str, classes: tuple[str, ...] | None) -> str:
    """``--task`` with ``auto`` decided from the agreed label: continuous -> regression, two classes -> binary,
    else classification. ``classes`` is ``None`` for a continuous label."""
    if task != "auto":
        return task
    if classes is None:
        return "regression"
    return "binary" if len(classes) == 2 else "classification"


def chosen_recipe(config: CoordinatorConfig, plan: DataPlan | None, num_classes: int) -> Recipe | None:
    """The run's recipe before its data statistics: the task (``auto`` decided from ``plan``), loss, threshold
    and shaped model's layers; ``None`` over a bundled data set with the classic task, so its requests stay
    byte for byte what they were. ``num_classes`` is the bundled data set's when ``plan`` is ``None``.

    Raises:
        IncompatibleWorkers: the task, or a flag of it, does not fit the workers' label (one line).
    """
    if plan is None and (config.hidden or config.dropout):
        raise IncompatibleWorkers("--hidden and --dropout shape the built-in models over own data, not a bundled one")
    if plan is None:  # the digits and MNIST demos: always classes, and "auto" keeps the classic task
        task = "classification" if config.task == "auto" else config.task
        classes: tuple[str, ...] | None = tuple(str(label) for label in range(num_classes))
        data = f"{num_classes} classes"
    else:
        classes = plan.classes
        task = decided_task(config.task, classes)
        data = "a continuous label" if classes is None else f"{len(classes)} classes"
    flags = "the workers' data" if config.task == "auto" else f"--task {task}"
    if config.loss is not None and task in TASK_KINDS and config.loss not in LOSSES[task]:
        raise IncompatibleWorkers(f"--loss {config.loss} does not fit a {task} task, which {flags} ({data}) make")
    if config.class_weights is not None and task != "classification" and task in TASK_KINDS:
        raise IncompatibleWorkers(f"--class-weights goes with a classification task, not {task} ({data})")
    if config.threshold != 0.5 and task != "binary" and task in TASK_KINDS:
        raise IncompatibleWorkers(f"--threshold goes with a binary task, not {task} ({data})")
    if config.target_units is not None and task != "regression" and task in TASK_KINDS:
        raise IncompatibleWorkers(f"--target-units goes with a regression task, not {task} ({data})")
    try:
        recipe = Recipe(
            task,
            config.loss or "",
            threshold=config.threshold,
            huber_delta=1.0 if config.huber_delta is None else config.huber_delta,
            hidden=config.hidden,
            dropout=config.dropout,
        )
        recipe.check_classes(classes)
    except ProtocolError as exc:
        raise IncompatibleWorkers(f"{flags} cannot train on the workers' data: {exc}") from None
    classic = plan is None and recipe == Recipe() and config.class_weights is None
    return None if classic else recipe


def agreed_plan(infos: Mapping[str, Info], *, evaluator: str | None = None) -> DataPlan | None:
    """The plan the workers' own data agree on, or ``None`` when they all hold a bundled data set.

    Raises:
        IncompatibleWorkers: some workers hold their own data and others a bundled data set,
            or their schemas disagree (one line naming the worker and the difference).
    """
    schemas = {name: info.schema for name, info in infos.items() if info.schema is not None}
    if not schemas:
        return None
    bundled = [name for name, info in infos.items() if info.schema is None]
    if bundled:
        own = next(iter(schemas))
        raise IncompatibleWorkers(
            f"{bundled[0]} holds the bundled {infos[bundled[0]].dataset} data set, but {own} its own"
            f" {schemas[own].kind}: start every worker with --data, or none"
        )
    return agree(schemas, evaluator=evaluator if evaluator in schemas else None)


def check_fits_plan(name: str, schema: DataSchema | None, plan: DataPlan) -> None:
    """A worker that (re)joins a run over own data holds data the run's ``plan`` can serve.

    Its classes must be among the plan's, its features the plan's, of the same
    type, and its input the plan's shape; categories outside the vocabulary
    are fine (they go to the "other" slot).

    Raises:
        IncompatibleWorkers: naming the worker and the first difference.
    """
    if schema is None:
        raise IncompatibleWorkers(f"{name} holds a bundled data set, but the run trains on own {plan.kind} data")
    if schema.kind != plan.kind:
        raise IncompatibleWorkers(f"{name} holds {schema.kind}, but the run trains on {plan.kind}")
    if plan.classes is None or schema.classes is None:
        if plan.classes != schema.classes:
            label = "continuous" if schema.classes is None else "class"
            raise IncompatibleWorkers(f"{name}'s label is {label}, unlike the run's")
    else:
        known = set(plan.classes)
        new = [c for c in schema.classes if c not in known]
        if new:
            raise IncompatibleWorkers(f"{name} holds class {new[0]!r}, which the run's model does not have")
    if plan.kind == "table":
        types = {feature.name: feature.type for feature in schema.features}
        for feature in plan.features:
            if feature not in types:
                raise IncompatibleWorkers(f"{name}'s table has no column {feature!r}")
            expected = "categorical" if feature in (plan.categories or {}) else "numeric"
            if types[feature] != expected:
                raise IncompatibleWorkers(f"{name}'s column {feature!r} is {types[feature]}, the run's {expected}")
    elif schema.input_shape != plan.input_shape:
        raise IncompatibleWorkers(f"{name}'s inputs have shape {schema.input_shape}, the run's {plan.input_shape}")


def check_rejoining(
    config: CoordinatorConfig, name: str, info: Info, reference: Info, model_name: str, plan: DataPlan | None = None
) -> None:
    """Check a worker that greets again mid-run as at the start, against the run's data and model.

    Raises:
        IncompatibleWorkers: as :func:`check_compatible`.
    """
    check_identity(config, name, info)
    if plan is None:
        check_data(name, info, "the others", reference)
    else:
        check_fits_plan(name, info.schema, plan)
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
            schema=entry.schema,
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
