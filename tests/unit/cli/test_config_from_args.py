"""config_from_args, derived from the config dataclasses' fields, gives what the hand-written functions gave.

The two functions below are the 55 and 38 hand-copied lines as they were
before the derivation (issue 15), kept verbatim as the reference: for every
combination of a broad set of flags, both give an equal config, or both
refuse the flags with the same error.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncfed.cli import coordinator, worker
from syncfed.cli.common import config_from_flags, parse_arguments
from syncfed.cli.coordinator import STRATEGY_FLAGS
from syncfed.config import CoordinatorConfig, WorkerConfig
from syncfed.datasets import parse_dataset_spec
from syncfed.partition import parse_classes, parse_shard

MANY = settings(max_examples=150, deadline=None)

WORKERS = {"alice": "ws://localhost:1", "bob": "ws://localhost:2", "charlie": "ws://localhost:3"}
EVALUATOR = {"testing": "ws://localhost:4"}


# The reference: the hand-written functions as they were.


def hand_written_coordinator_config(
    args: argparse.Namespace, workers: dict[str, str], evaluator: dict[str, str]
) -> CoordinatorConfig:
    return CoordinatorConfig(
        workers=workers,
        evaluator=evaluator,
        model=args.model,
        training_rounds=args.training_rounds,
        federate_after_n_batches=10 if args.federate_after_n_batches is None else args.federate_after_n_batches,
        batch_size=args.batch_size,
        test_batch_size=args.test_batch_size,
        lr=args.lr,
        lr_decay=args.lr_decay,
        seed=args.seed,
        strategy=args.strategy,
        strategy_settings={
            setting: getattr(args, f"setting_{setting}")
            for setting, _, _ in STRATEGY_FLAGS.values()
            if getattr(args, f"setting_{setting}") is not None
        },
        fraction_fit=args.fraction_fit,
        min_fit_workers=args.min_fit_workers,
        mode=args.mode,
        buffer_size=args.buffer_size,
        staleness_weight=args.staleness_weight,
        staleness_a=args.staleness_a,
        staleness_b=args.staleness_b,
        max_staleness=args.max_staleness,
        compress=args.compress,
        registry=None
        if args.no_registry
        else args.registry or (args.metrics_out.parent / "registry" if args.metrics_out is not None else None),
        chunk_size=args.chunk_size,
        receive_slots=args.receive_slots,
        eval_every=args.eval_every,
        federated_eval=args.federated_eval,
        cross_site_validation=args.cross_site_validation,
        cross_site_out=args.cross_site_out,
        dataset_key=args.dataset_key,
        save_model=args.save_model,
        metrics_out=args.metrics_out,
        max_message_size=args.max_message_size,
        connect_timeout=args.connect_timeout,
        request_timeout=args.request_timeout,
        round_timeout=args.round_timeout,
        min_workers=args.min_workers,
        max_round_retries=args.max_round_retries,
        ping_interval=args.ping_interval,
        ping_timeout=args.ping_timeout,
        reconnect_max_delay=args.reconnect_max_delay,
        checkpoint_dir=args.checkpoint_dir,
        resume=args.resume,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        auth_token_file=args.auth_token_file,
        secure_agg=args.secure_agg,
        secagg_threshold=args.secagg_threshold,
        secagg_clip=args.secagg_clip,
        dp=args.dp,
        dp_clip=args.dp_clip,
        dp_noise_multiplier=args.dp_noise_multiplier,
        dp_delta=args.dp_delta,
        dp_target_epsilon=args.dp_target_epsilon,
    )


def hand_written_worker_config(args: argparse.Namespace) -> WorkerConfig:
    testing = args.testing or args.id == "testing"
    return WorkerConfig(
        worker_id=args.id,
        host=args.host,
        port=args.port,
        testing=testing,
        dataset=args.dataset,
        data_dir=args.data_dir,
        digits=parse_classes(args.digits) if args.digits else None,
        shard=parse_shard(args.shard) if args.shard else None,
        shard_seed=args.shard_seed,
        val_fraction=args.val_fraction,
        val_seed=args.val_seed,
        datasets=tuple(parse_dataset_spec(text) for text in args.dataset_spec),
        models=tuple(args.model),
        bench_models=args.bench_models,
        cuda=args.cuda,
        threads=args.threads,
        share_cores=args.threads is None,
        download=not args.no_download,
        max_message_size=args.max_message_size,
        max_in_flight=args.max_in_flight,
        chunk_size=args.chunk_size,
        max_connections=args.max_connections,
        max_pending_connections=args.max_pending_connections,
        handshake_timeout=args.handshake_timeout,
        idle_timeout=args.idle_timeout or None,
        max_secagg_clients=args.max_secagg_clients,
        min_group_size=args.min_group_size,
        dp_sgd_noise_multiplier=args.dp_sgd,
        dp_sgd_clip=args.dp_sgd_clip,
        dp_sgd_delta=args.dp_sgd_delta,
        batch_delay=args.batch_delay,
        attack=args.attack,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_ca=args.tls_ca,
        allow_coordinators=tuple(args.allow_coordinator),
        auth_token_file=args.auth_token_file,
        withhold_histogram=args.withhold_histogram,
    )


def outcome(build: Callable[[], Any]) -> Any:
    """The config built, or the type and text of the error that refused it."""
    try:
        return build()
    except Exception as exc:  # noqa: BLE001  # the comparison covers every refusal alike
        return type(exc), str(exc)


#: Coordinator flags, alone or with the flags they need; subsets of them are combined below.
COORDINATOR_FLAGS: list[list[str]] = [
    ["--batch-size", "16"],
    ["--test-batch-size", "64"],
    ["--training-rounds", "5"],
    ["--federate-after-n-batches", "3"],
    ["--lr", "0.05"],
    ["--lr-decay", "0.9"],
    ["--seed", "7"],
    ["--strategy", "fedprox", "--mu", "0.1"],
    ["--aggregation", "fedadam", "--server-lr", "0.01", "--beta1", "0.8", "--beta2", "0.9", "--tau", "0.01"],
    ["--strategy", "multi-krum", "--byzantine-f", "0", "--multi-krum-m", "2"],
    ["--trim-ratio", "0.1"],
    ["--fraction-fit", "0.5"],
    ["--min-fit-workers", "2"],
    ["--mode", "async", "--buffer-size", "3"],
    ["--staleness-weight", "hinge", "--staleness-a", "0.2", "--staleness-b", "3"],
    ["--max-staleness", "5"],
    ["--model", "digits-cnn"],
    ["--eval-every", "2"],
    ["--federated-eval"],
    ["--cross-site-validation"],
    ["--cross-site-out", "cross"],
    ["--dataset-key", "digits-train"],
    ["--save-model", "model.safetensors"],
    ["--metrics-out", "runs/metrics.jsonl"],
    ["--registry", "models"],
    ["--no-registry"],
    ["--round-timeout", "30"],
    ["--min-workers", "2"],
    ["--max-round-retries", "1"],
    ["--ping-interval", "2"],
    ["--ping-timeout", "5"],
    ["--reconnect-max-delay", "4"],
    ["--checkpoint-dir", "checkpoints"],
    ["--resume"],
    ["--chunk-size", "1MiB"],
    ["--receive-slots", "0"],
    ["--compress", "fp16"],
    ["--max-message-size", "64MiB"],
    ["--connect-timeout", "3"],
    ["--request-timeout", "9"],
    ["--tls-ca", "ca.pem"],
    ["--tls-cert", "cert.pem", "--tls-key", "key.pem"],
    ["--auth-token-file", "token"],
    ["--secure-agg", "--secagg-threshold", "3"],
    ["--secagg-clip", "2"],
    ["--dp", "central", "--dp-noise-multiplier", "1.0"],
    ["--dp", "distributed", "--dp-target-epsilon", "5"],
    ["--dp-clip", "0.5"],
    ["--dp-delta", "1e-6"],
    # Flags that are no config field: they must not leak into one.
    ["--spawn-workers", "--dataset", "mnist", "--data-dir", "elsewhere", "--cuda"],
    ["--verbose", "--no-progress"],
]

#: Worker flags; ``--id bob`` comes first, so a later ``--id`` wins.
WORKER_FLAGS: list[list[str]] = [
    ["--id", "alice"],
    ["--id", "testing"],
    ["--host", "0.0.0.0"],
    ["--port", "0"],
    ["--testing"],
    ["--dataset", "mnist"],
    ["--data-dir", "elsewhere"],
    ["--digits", "0-3"],
    ["--digits", "9,x"],
    ["--shard", "2/4"],
    ["--shard", "5/4"],
    ["--shard-seed", "3"],
    ["--val-fraction", "0.2"],
    ["--val-seed", "11"],
    ["--dataset-spec", "digits-train=digits:train"],
    ["--dataset-spec", "digits-test=digits:test"],
    ["--dataset-spec", "nonsense"],
    ["--model", "mypkg.models:Net"],
    ["--bench-models"],
    ["--cuda"],
    ["--threads", "2"],
    ["--no-download"],
    ["--max-message-size", "8MiB"],
    ["--chunk-size", "1MiB"],
    ["--max-in-flight", "2"],
    ["--max-connections", "3"],
    ["--max-pending-connections", "4"],
    ["--handshake-timeout", "2.5"],
    ["--idle-timeout", "0"],
    ["--idle-timeout", "50"],
    ["--max-secagg-clients", "16"],
    ["--min-group-size", "25"],
    ["--dp-sgd", "1.1", "--dp-sgd-clip", "0.7", "--dp-sgd-delta", "1e-6"],
    ["--withhold-histogram"],
    ["--slowdown", "0.01"],
    ["--attack", "nan"],
    ["--tls-cert", "cert.pem", "--tls-key", "key.pem"],
    ["--tls-ca", "ca.pem"],
    ["--allow-coordinator", "coordinator", "--allow-coordinator", "backup"],
    ["--auth-token-file", "token"],
    ["--verbose"],
]

COORDINATOR_PARSER = coordinator.build_parser()
WORKER_PARSER = worker.build_parser()


def both_coordinator_configs(argv: list[str]) -> tuple[Any, Any]:
    args = parse_arguments(COORDINATOR_PARSER, argv)
    derived = outcome(lambda: coordinator.config_from_args(args, WORKERS, EVALUATOR))
    return derived, outcome(lambda: hand_written_coordinator_config(args, WORKERS, EVALUATOR))


def both_worker_configs(argv: list[str]) -> tuple[Any, Any]:
    args = parse_arguments(WORKER_PARSER, ["--id", "bob", *argv])
    return outcome(lambda: worker.config_from_args(args)), outcome(lambda: hand_written_worker_config(args))


@pytest.mark.parametrize(
    "argv",
    [
        [],
        [token for flags in COORDINATOR_FLAGS[:8] + COORDINATOR_FLAGS[11:13] for token in flags],
        ["--mode", "async", "--max-staleness", "2", "--metrics-out", "out/m.jsonl", "--compress", "int8"],
        [
            "--secure-agg",
            "--dp",
            "distributed",
            "--dp-noise-multiplier",
            "0.8",
            "--registry",
            "r",
            "--resume",
            "--checkpoint-dir",
            "c",
            "--tls-ca",
            "ca.pem",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
        ],
    ],
)
def test_the_coordinator_config_is_the_hand_written_one(argv: list[str]) -> None:
    derived, reference = both_coordinator_configs(argv)
    assert isinstance(reference, CoordinatorConfig), reference  # these sets are valid: a config to compare
    assert derived == reference


@MANY
@given(st.lists(st.sampled_from(COORDINATOR_FLAGS), max_size=12))
def test_any_coordinator_flags_give_the_hand_written_config_or_error(chosen: list[list[str]]) -> None:
    derived, reference = both_coordinator_configs([token for flags in chosen for token in flags])
    assert derived == reference


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--id", "testing"],
        [
            *("--host", "0.0.0.0", "--port", "0", "--dataset", "mnist", "--data-dir", "d", "--digits", "0-3"),
            *("--shard-seed", "3", "--val-fraction", "0.2", "--val-seed", "11", "--model", "mypkg.models:Net"),
            *("--dataset-spec", "a=digits:train", "--dataset-spec", "b=digits:test", "--bench-models", "--cuda"),
            *("--threads", "2", "--max-message-size", "8MiB", "--chunk-size", "1MiB", "--max-in-flight", "2"),
            *("--max-connections", "3", "--max-pending-connections", "4", "--handshake-timeout", "2.5"),
            *("--idle-timeout", "50", "--max-secagg-clients", "16", "--min-group-size", "25", "--dp-sgd", "1.1"),
            *("--dp-sgd-clip", "0.7", "--dp-sgd-delta", "1e-6", "--withhold-histogram", "--slowdown", "0.01"),
            *("--attack", "nan", "--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-ca", "ca.pem"),
            *("--allow-coordinator", "x", "--allow-coordinator", "y", "--auth-token-file", "t", "--verbose"),
        ],
        ["--shard", "1/3", "--idle-timeout", "0", "--dataset-spec", "d=digits:train", "--no-download"],
    ],
)
def test_the_worker_config_is_the_hand_written_one(argv: list[str]) -> None:
    derived, reference = both_worker_configs(argv)
    assert isinstance(reference, WorkerConfig), reference
    assert derived == reference


@MANY
@given(st.lists(st.sampled_from(WORKER_FLAGS), max_size=12))
def test_any_worker_flags_give_the_hand_written_config_or_error(chosen: list[list[str]]) -> None:
    derived, reference = both_worker_configs([token for flags in chosen for token in flags])
    assert derived == reference


def test_a_field_without_a_flag_or_a_special_case_is_a_programming_error() -> None:
    @dataclasses.dataclass(frozen=True)
    class Settings:
        rounds: int
        seed: int = 1

    args = argparse.Namespace(rounds=3)
    with pytest.raises(TypeError, match=r"^Settings.seed has no flag of its name and no entry among the special"):
        config_from_flags(Settings, args, {})
    assert config_from_flags(Settings, args, {"seed": None}) == Settings(3)  # no flag: the default
    assert config_from_flags(Settings, args, {"seed": lambda a: a.rounds * 2}) == Settings(3, 6)
    assert config_from_flags(Settings, args, {"seed": None}, rounds=5) == Settings(5)
    with pytest.raises(TypeError, match=r"^Settings has no fields sead$"):
        config_from_flags(Settings, args, {"sead": None})
