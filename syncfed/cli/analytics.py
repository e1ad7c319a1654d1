"""``python -m syncfed analytics``: statistics over all workers' data, without moving a row.

Flags, tables and printing only: greeting and asking the workers is
:mod:`syncfed.coordinator.query_round`'s.

Usage::

    python -m syncfed analytics --workers alice=ws://localhost:8777,bob=ws://localhost:8778 label-histogram
    python -m syncfed analytics feature-stats --features 0-7,36
    python -m syncfed analytics --json q.json quantiles --range -0.82 1.85 --bins 256 --q 0.1,0.5,0.9

    python -m syncfed analytics --dp-epsilon 1.0 feature-stats --clip-range -0.82 1.85
    python -m syncfed analytics --secure-agg quantiles --range -0.82 1.85

Every worker is asked at once and the table combines those that answered. A
worker that refuses (a group below its ``--min-group-size``), fails or cannot
be reached is named on stderr, and the exit status is then that of its error
(``common.EXIT_CODES``: 6 for a refusal, 5 for an unreachable worker).

With ``--dp-epsilon`` the printed and saved answer is epsilon-differentially
private with respect to one example added or removed at any worker (Laplace
mechanism, :mod:`syncfed.analytics`): only the noisy combined figures are
shown, never per-worker counts or exact sizes.

With ``--secure-agg`` the answers are summed by secure aggregation
(:mod:`syncfed.net.secure_round`): this command learns the sum over the workers
and never one worker's answer, so only totals are shown. ``feature-stats``
then needs ``--clip-range``, since the moments travel as bounded sums. It
combines with ``--dp-epsilon``, which adds the noise to the sum.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..analytics import (
    Laplace,
    Quantiles,
    combine_feature_stats,
    combine_labels,
    combine_quantiles,
    private_feature_stats,
    private_labels,
    private_quantiles,
)
from ..config import DEFAULT_WORKERS, parse_endpoints
from ..coordinator.proposal import refusal_line
from ..coordinator.query_round import DEFAULT_QUERY_TIMEOUT, QueryAnswers, QueryRound, QuerySettings
from ..exceptions import ConfigError, ProtocolError, SyncfedError
from ..net.link import WorkerLink
from ..partition import parse_classes
from ..protocol import MAX_FEATURES, Query, QueryResult
from .common import (
    INTERRUPTED,
    Parser,
    add_client_security_flags,
    add_connection_limits,
    add_secure_agg_flags,
    exit_code,
    fail,
    link_settings,
    normalize_flags,
    run_program,
    setup_logging,
    stdout_closed,
)

__all__ = ["PROGRAM", "DEFAULT_QUERY_TIMEOUT", "configure", "run", "main"]

PROGRAM = "python -m syncfed analytics"


def _selection(text: str) -> tuple[int, ...] | None:
    """``all`` (None), ``none`` (no feature) or indices such as ``0-7,36``, for argparse."""
    if text == "all":
        return None
    if text == "none":
        return ()
    try:
        return parse_classes(text, MAX_FEATURES)
    except ConfigError:
        raise argparse.ArgumentTypeError(f"{text!r} is not all, none or indices such as 0-7,36") from None


def _probabilities(text: str) -> tuple[float, ...]:
    """Quantile probabilities such as ``0.1,0.5,0.9``, for argparse."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of probabilities such as 0.1,0.5,0.9") from None
    outside = [value for value in values if not 0 <= value <= 1]
    if outside:
        raise argparse.ArgumentTypeError(f"probability {outside[0]:g} is not within 0..1")
    return values


def _epsilon(text: str) -> float:
    """A privacy budget: a positive finite number, for argparse."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive finite number")
    return value


def _seed(text: str) -> int:
    """A noise seed: numpy's generators take non-negative integers, for argparse."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative integer")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the connection flags and the three queries to ``parser`` (its own, or ``python -m syncfed``'s)."""
    parser.add_argument("--workers", default=DEFAULT_WORKERS, help="workers as id=uri,... (default: %(default)s)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the combined answer to OUT as JSON")
    parser.add_argument("--verbose", action="store_true", help="log connections and requests")
    privacy = parser.add_argument_group("differential privacy")
    privacy.add_argument(
        "--dp-epsilon",
        type=_epsilon,
        metavar="EPS",
        help="release the answer epsilon-DP for one example added or removed at any worker (Laplace noise)",
    )
    privacy.add_argument(
        "--dp-seed", type=_seed, metavar="N", help="seed the noise, for tests only (default: fresh from the OS)"
    )
    secure = parser.add_argument_group("secure aggregation (docs/privacy.md)")
    add_secure_agg_flags(secure, summed="the workers' answers", among="the workers that answer the greeting")
    add_client_security_flags(parser)
    limits = parser.add_argument_group("limits and timeouts")
    add_connection_limits(limits)
    limits.add_argument(
        "--request-timeout",
        type=float,
        default=DEFAULT_QUERY_TIMEOUT,
        help="seconds each worker has to answer the query (default: %(default)s)",
    )
    queries = parser.add_subparsers(dest="query", required=True, metavar="QUERY")
    queries.add_parser("label-histogram", help="examples per class")
    stats = queries.add_parser("feature-stats", help="per feature count, mean and variance, exactly")
    stats.add_argument(
        "--features",
        type=_selection,
        default=None,
        help="features (indices into the flattened input) to show: all, none or e.g. 0-7,36; a row over"
        " all features is always shown (default: all)",
    )
    stats.add_argument(
        "--clip-range",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="with --dp-epsilon or --secure-agg (required there): workers clip every value to this range, in"
        " the data's units (digits: -0.82 1.85, MNIST: -0.43 2.83)",
    )
    quantiles = queries.add_parser("quantiles", help="approximate quantiles from fixed-bin histograms")
    quantiles.add_argument(
        "--range",
        dest="value_range",
        type=float,
        nargs=2,
        required=True,
        metavar=("LOW", "HIGH"),
        help="the histogram's range, in the data's units (digits: -0.82 1.85, MNIST: -0.43 2.83)",
    )
    quantiles.add_argument(
        "--bins", type=int, default=256, help="equal bins over the range; the error bound is one (default: 256)"
    )
    quantiles.add_argument(
        "--q",
        dest="probabilities",
        type=_probabilities,
        default=(0.1, 0.5, 0.9),
        help="quantile probabilities (default: 0.1,0.5,0.9)",
    )
    quantiles.add_argument(
        "--features",
        type=_selection,
        default=(),
        help="features to show besides the row over all features: all, none or e.g. 0-7,36 (default: none;"
        " workers refuse a feature whose histogram has a small non-empty cell)",
    )


def _check_bins(args: argparse.Namespace) -> None:
    """Check --bins and --range before connecting to anyone."""
    try:
        Query("quantiles", (), args.bins, tuple(args.value_range))
    except ProtocolError as exc:
        raise ConfigError(f"--bins {args.bins} --range {' '.join(map(str, args.value_range))}: {exc}") from None


def _check_privacy(args: argparse.Namespace) -> None:
    """Check the differential privacy and secure aggregation flags before connecting to anyone."""
    clip = getattr(args, "clip_range", None)
    if args.dp_epsilon is None and args.dp_seed is not None:
        raise ConfigError("--dp-seed only applies with --dp-epsilon")
    if args.secure_agg:
        workers = len(parse_endpoints(args.workers))
        threshold = args.secagg_threshold
        if workers < 2:
            raise ConfigError(f"--secure-agg needs at least 2 workers, not {workers}")
        if threshold is not None and not workers / 2 < threshold <= workers:
            raise ConfigError(
                f"--secagg-threshold {threshold} must be more than half of, and at most, the {workers} workers"
            )
    elif args.secagg_threshold is not None:
        raise ConfigError("--secagg-threshold needs --secure-agg")
    flags = " and ".join(
        flag for flag, on in (("--dp-epsilon", args.dp_epsilon is not None), ("--secure-agg", args.secure_agg)) if on
    )
    if not flags:
        if clip is not None:
            raise ConfigError("--clip-range only applies with --dp-epsilon or --secure-agg")
        return
    if args.query != "feature-stats":
        return
    if clip is None:
        raise ConfigError(
            f"feature-stats with {flags} needs --clip-range LOW HIGH (digits: -0.82 1.85, MNIST: -0.43 2.83)"
        )
    low, high = clip
    if not (math.isfinite(high - low) and low < high):
        raise ConfigError(f"--clip-range {low:g} {high:g} must be two finite numbers low < high")


async def _ask(args: argparse.Namespace) -> QueryAnswers:
    """Run the query round the flags describe (:class:`syncfed.coordinator.query_round.QueryRound`)."""
    settings = QuerySettings(
        args.query,
        features=getattr(args, "features", ()),
        bins=getattr(args, "bins", None),
        value_range=tuple(args.value_range) if args.query == "quantiles" else None,
        clip_range=tuple(args.clip_range) if getattr(args, "clip_range", None) is not None else None,
        secure_agg=args.secure_agg,
        secagg_threshold=args.secagg_threshold,
        dp_epsilon=args.dp_epsilon,
        request_timeout=args.request_timeout,
    )

    def link(name: str, uri: str) -> WorkerLink:
        return WorkerLink.from_settings(name, uri, link_settings(args, uri, request_timeout=args.request_timeout))

    return await QueryRound(parse_endpoints(args.workers), settings, link=link).run()


def _number(value: float, low: float = -math.inf, high: float = math.inf) -> str:
    if value == -math.inf:
        return f"<{low:g}"
    if value == math.inf:
        return f">{high:g}"
    return f"{value:.6g}"


def _finite(values: np.ndarray) -> list[float | None]:
    """JSON has no infinity: a quantile outside the range becomes null."""
    return [float(value) if math.isfinite(value) else None for value in values]


def _label_names(query: Query, count: int) -> list[str]:
    """The histogram's rows: the agreed class names over own data, else the label numbers (the digits)."""
    classes = query.data.classes if query.data is not None else None
    return list(classes) if classes is not None else [str(label) for label in range(count)]


def _tabulate(
    query: Query, results: dict[str, QueryResult], probabilities: Sequence[float], *, per_worker: bool = True
) -> tuple[list[list[str]], dict[str, Any]]:
    """The printed table (header first) and the JSON answer of the combined results.

    ``per_worker``: show each worker's label counts beside the total (not
    after secure aggregation, which leaves only the total).
    """
    if query.query == "label-histogram" and not per_worker:
        total = combine_labels(query, results)
        rows = [
            ["label", "total"],
            *([label, str(count)] for label, count in zip(_label_names(query, len(total)), total, strict=True)),
        ]
        rows.append(["total", str(total.sum())])
        return rows, {"total": total.tolist()}
    if query.query == "label-histogram":
        total = combine_labels(query, results)
        counts = {name: result.tensors["labels"] for name, result in results.items()}
        rows = [["label", *results, "total"]]
        rows += [
            [name, *(str(c[label]) for c in counts.values()), str(total[label])]
            for label, name in enumerate(_label_names(query, len(total)))
        ]
        rows.append(["total", *(str(result.num_examples) for result in results.values()), str(total.sum())])
        answer = {"total": total.tolist(), "per_worker": {name: c.tolist() for name, c in counts.items()}}
        return rows, answer
    if query.query == "feature-stats":
        stats = combine_feature_stats(query, results)
        rows = [["feature", "count", "mean", "variance", "std"]]
        entries = []
        for label, moments, index in [
            *((str(f), stats.selected, i) for i, f in enumerate(stats.features)),
            ("all", stats.pooled, 0),
        ]:
            mean, variance = float(moments.mean[index]), float(moments.variance[index])
            rows.append([label, str(moments.count), _number(mean), _number(variance), _number(math.sqrt(variance))])
            entries.append({"feature": label, "count": moments.count, "mean": mean, "variance": variance})
        return rows, {"variance": "population (ddof=0)", "features": entries}
    estimate = combine_quantiles(query, results, probabilities)
    rows, answer = _quantile_table(estimate, probabilities)
    return rows, {**answer, "error_bound": estimate.bin_width}


def _quantile_table(estimate: Quantiles, probabilities: Sequence[float]) -> tuple[list[list[str]], dict[str, Any]]:
    """The table and the JSON answer of quantile estimates, exact or noisy."""
    low, high = float(estimate.edges[0]), float(estimate.edges[-1])
    rows = [["feature", *(f"q{q:g}" for q in probabilities)]]
    entries = []
    for label, values in [*zip(map(str, estimate.features), estimate.values, strict=True), ("all", estimate.pooled)]:
        rows.append([label, *(_number(value, low, high) for value in values)])
        entries.append({"feature": label, "quantiles": _finite(values)})
    answer = {"probabilities": list(probabilities), "bins": len(estimate.edges) - 1, "range": [low, high]}
    return rows, {**answer, "features": entries}


def _noise(released: str, mechanism: Laplace) -> dict[str, Any]:
    """One mechanism's entry in the JSON answer."""
    return {
        "released": released,
        "mechanism": "laplace",
        "epsilon": mechanism.epsilon,
        "sensitivity": mechanism.sensitivity,
        "scale": mechanism.scale,
    }


def _tabulate_private(
    query: Query, results: dict[str, QueryResult], probabilities: Sequence[float], epsilon: float, seed: int | None
) -> tuple[list[list[str]], dict[str, Any]]:
    """Like :func:`_tabulate`, but of the noisy combined answer only, with the noise it carries."""
    rng = np.random.default_rng(seed)  # None: fresh entropy from the OS, never from the data
    if query.query == "label-histogram":
        total, mechanism = private_labels(query, results, epsilon, rng)
        names = _label_names(query, len(total))
        rows = [["label", "total"], *([name, f"{count:.1f}"] for name, count in zip(names, total, strict=True))]
        rows.append(["total", f"{total.sum():.1f}"])
        return rows, {"total": total.tolist(), "noise": [_noise("each count", mechanism)]}
    if query.query == "feature-stats":
        stats = private_feature_stats(query, results, epsilon, rng)
        rows = [["feature", "count", "mean", "variance", "std"]]
        entries = []
        for index, label in enumerate([*map(str, stats.features), "all"]):
            count, mean, variance = (float(stats.count[index]), float(stats.mean[index]), float(stats.variance[index]))
            rows.append([label, f"{count:.1f}", _number(mean), _number(variance), _number(math.sqrt(variance))])
            entries.append({"feature": label, "count": count, "mean": mean, "variance": variance})
        released = ("the count", "the sums", "the sums of squares")
        assert query.value_range is not None  # _query sets the clipping range under --dp-epsilon
        return rows, {
            "variance": "population (ddof=0)",
            "clip_range": list(query.value_range),
            "features": entries,
            "noise": [_noise(name, m) for name, m in zip(released, stats.mechanisms, strict=True)],
        }
    estimate, mechanism = private_quantiles(query, results, probabilities, epsilon, rng)
    rows, answer = _quantile_table(estimate, probabilities)
    answer["noise"] = [_noise("each histogram cell", mechanism)]
    return rows, answer


def _privacy_line(epsilon: float, noise: list[dict[str, Any]]) -> str:
    parts = ", ".join(f"{n['scale']:.4g} on {n['released']} (sensitivity {n['sensitivity']:.4g})" for n in noise)
    return f"{epsilon:g}-differentially private: Laplace noise of scale {parts}"


def _secure_line(secure: dict[str, Any]) -> str:
    recovered = secure["recovered"]
    within = f"threshold {secure['threshold']} of {secure['workers']} workers"
    if recovered:
        within += f"; left after masking, unmasked from the others' shares: {', '.join(recovered)}"
    line = f"securely aggregated: only the sum of the answers was revealed ({within})"
    bound = secure["sum_error_bound"]
    return line + (f"; fixed-point sums within {bound:.3g}" if bound else "")


def _print_table(rows: list[list[str]]) -> None:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))


def run(args: argparse.Namespace) -> int:
    """Ask, combine and print; each failed worker gets one line on stderr and sets the exit status."""
    setup_logging(args.verbose, default=30)
    probabilities = getattr(args, "probabilities", ())
    epsilon = args.dp_epsilon
    try:
        if args.query == "quantiles":
            _check_bins(args)
        _check_privacy(args)
        answers = asyncio.run(_ask(args))
        query, results, failures, secure = answers.query, answers.results, answers.failures, answers.secure
        for name, error in failures.items():
            refused = answers.refusals.get(name)
            print(f"{PROGRAM}: {error if refused is None else refusal_line(name, refused)}", file=sys.stderr)
        if answers.error is not None:
            return fail(PROGRAM, answers.error)
        if query is not None and results:
            left_out = f"; left out: {', '.join(failures)}" if failures else ""
            names: list[str] = list(results) if secure is None else secure["summed"]
            answered: dict[str, int] | list[str] = names
            if epsilon is None:
                rows, answer = _tabulate(query, results, probabilities, per_worker=secure is None)
                examples = sum(result.num_examples for result in results.values())
                if secure is None:
                    answered = {name: result.num_examples for name, result in results.items()}
                print(f"{query.query} over {examples} examples of {len(names)} workers ({', '.join(names)}){left_out}")
            else:  # exact sizes would spoil the guarantee: name the workers only
                rows, answer = _tabulate_private(query, results, probabilities, epsilon, args.dp_seed)
                answer["epsilon"] = epsilon
                print(f"{query.query} over {len(names)} workers ({', '.join(names)}){left_out}")
                print(_privacy_line(epsilon, answer["noise"]))
            if secure is not None:
                answer["secure_agg"] = secure
                print(_secure_line(secure))
            if query.query == "quantiles":
                low, high = answer["range"]
                bound = (
                    f"within {answer['error_bound']:.4g} (one bin width) of the pooled quantile inside the range"
                    if epsilon is None
                    else "read off noisy histograms, within one bin width only as far as the noise allows"
                )
                print(f"{query.bins} bins over [{low:g}, {high:g}]: {bound}")
            _print_table(rows)
            if args.json is not None:
                document = {
                    "query": query.query,
                    "answered": answered,
                    "failed": {name: str(error) for name, error in failures.items()},
                    **answer,
                }
                args.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    except SyncfedError as exc:
        return fail(PROGRAM, exc)
    except KeyboardInterrupt:
        print(f"{PROGRAM}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:
        return stdout_closed()
    except OSError as exc:  # the JSON file cannot be written
        print(f"{PROGRAM}: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    return exit_code(next(iter(failures.values()))) if failures else 0


def main(argv: list[str] | None = None) -> int:
    """The program; ``argv`` defaults to the command line."""
    return run_program(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    parser = Parser(prog=PROGRAM, description="statistics over all workers' data, without moving it")
    configure(parser)
    return run(parser.parse_args(normalize_flags(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
