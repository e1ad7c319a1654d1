"""Cross-site validation: after the last round, every model scored on every site's data.

A workflow of its own, as NVFlare's ``cross_site_model_eval``: rows are each
trainer's final local model and the federated one, columns each site's data
(a trainer's validation split, the evaluator's test set). The matrix is
printed, saved (:func:`~syncfed.evaluation.write_cross_site`) and written to
the metrics file.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from ..evaluation import TEST, VALIDATION, Cell, CrossSiteMatrix, write_cross_site
from ..net.link import WorkerLink
from ..tensors import Weights
from .context import RunContext
from .results import RunResult

__all__ = ["cross_site_validation"]

#: Cross-site evaluation requests in flight per site: a worker computes one at a time, and a second
#: one queued keeps it busy without nearing its limit of requests in flight.
_PIPELINE = 2


async def cross_site_validation(context: RunContext, result: RunResult) -> None:
    """Score each trainer's final local model and the global one on every site's data; print and save the matrix.

    Requests go to all sites at once, at most ``_PIPELINE`` at a time per
    site, each under the request timeout; a site that fails leaves its cells
    empty with the reason.
    """
    config, report, evaluator = context.config, context.report, context.pool.evaluator
    sites = [*context.pool.trainers, *([evaluator] if evaluator is not None else [])]
    await context.pool.rejoin(sites)
    models: dict[str, Weights | None] = {name: context.local_models.get(name) for name in config.workers}
    models[result.global_model] = result.weights
    gates = {link.name: asyncio.Semaphore(_PIPELINE) for link in sites}

    async def cell(weights: Weights | None, link: WorkerLink) -> Cell:
        if weights is None:
            return "no local model: the worker contributed to no round of this run"
        async with gates[link.name]:
            return await context.evaluation.score(link, weights, None if link is evaluator else VALIDATION)

    cells = await asyncio.gather(*(cell(weights, link) for weights in models.values() for link in sites))
    last = result.rounds[-1].round if result.rounds else config.training_rounds
    matrix = CrossSiteMatrix(
        last,
        tuple(models),
        tuple(link.name for link in sites),
        tuple(TEST if link is evaluator else VALIDATION for link in sites),
        tuple(tuple(cells[row * len(sites) : (row + 1) * len(sites)]) for row in range(len(models))),
        context.evaluation.readout,
    )
    result.cross_site = matrix
    report(f"Cross-site validation after {config.step} {last} ({matrix.metric_title}; rows: models, columns: data):")
    for line in matrix.table():
        report(line)
    directory = config.cross_site_out or (
        config.metrics_out.parent / "cross-site" if config.metrics_out is not None else Path("cross-site")
    )
    written = write_cross_site(matrix, directory)
    missing = "" if len(written) > 1 else " (no heat map: matplotlib is not installed)"
    report(f"Saved the cross-site matrix to {', '.join(str(path) for path in written)}{missing}")
    context.journal.write({"event": "cross_site", **matrix.to_json()})
