"""The handshake checks, pure: each refusal names the worker and what to start it with; no sockets."""

from __future__ import annotations

from dataclasses import replace

import pytest

from syncfed.compatibility import (
    check_compatible,
    check_data,
    check_identity,
    check_model_available,
    check_rejoining,
    chosen_data,
)
from syncfed.config import CoordinatorConfig
from syncfed.exceptions import IncompatibleWorkers
from syncfed.protocol import PROTOCOL_VERSION, Info

CONFIG = CoordinatorConfig(workers={"alice": "ws://unused", "bob": "ws://unused"}, evaluator={"eve": "ws://unused"})


def info(name: str, role: str = "trainer", **changes: object) -> Info:
    base = Info(name, role, "digits", (1, 8, 8), 10, (3,) * 10, ("digits-cnn",), validation_size=4)
    return replace(base, **changes)


def refusal(check: object, *args: object) -> str:
    assert callable(check)
    with pytest.raises(IncompatibleWorkers) as error:
        check(*args)
    return str(error.value)


def test_compatible_workers_agree_on_the_default_model_and_the_reference_data() -> None:
    infos = {"alice": info("alice"), "bob": info("bob"), "eve": info("eve", "evaluator")}
    model_name, reference, plan, recipe = check_compatible(CONFIG, infos)
    assert model_name == "digits-cnn" and reference is infos["alice"] and plan is None
    assert recipe is None  # the classic demo: its requests carry no recipe, byte for byte as before


def test_identity_a_worker_listed_under_another_name() -> None:
    assert refusal(check_identity, CONFIG, "alice", info("mallory")) == "the worker listed as alice says it is mallory"


def test_identity_another_protocol_version() -> None:
    old = info("alice", protocol_version=PROTOCOL_VERSION - 1)
    assert refusal(check_identity, CONFIG, "alice", old) == (
        f"alice speaks protocol version {PROTOCOL_VERSION - 1}, this coordinator {PROTOCOL_VERSION}"
    )


def test_identity_role_an_evaluator_listed_as_a_trainer_and_back() -> None:
    assert refusal(check_identity, CONFIG, "alice", info("alice", "evaluator")) == (
        "alice is an evaluator (started with --testing) but is listed as the trainer"
    )
    assert refusal(check_identity, CONFIG, "eve", info("eve")) == (
        "eve is a trainer (started without --testing) but is listed as the evaluator"
    )


def test_identity_a_trainer_without_examples() -> None:
    assert refusal(check_identity, CONFIG, "alice", info("alice", histogram=(0,) * 10)) == (
        "alice holds no training examples"
    )


def test_data_mismatch_names_the_worker_and_the_reference() -> None:
    assert refusal(check_data, "bob", info("bob", num_classes=2, histogram=(1, 1)), "alice", info("alice")) == (
        "bob has num_classes 2, but alice has 10"
    )
    infos = {"alice": info("alice"), "bob": info("bob", input_shape=(3, 32, 32))}
    assert refusal(check_compatible, CONFIG, infos) == "bob has input_shape (3, 32, 32), but alice has (1, 8, 8)"


def test_model_unavailable_says_which_models_the_worker_has() -> None:
    assert refusal(check_model_available, "bob", info("bob", models=("mnist-cnn",)), "digits-cnn") == (
        "bob cannot build model digits-cnn (it has mnist-cnn); start it with --model digits-cnn"
    )
    config = replace(CONFIG, model="mnist-cnn")
    message = refusal(check_compatible, config, {"alice": info("alice", models=("digits-cnn", "mnist-cnn"))})
    assert message.startswith("model mnist-cnn does not fit the workers' digits data: ")


def test_a_rejoining_worker_is_checked_against_the_others() -> None:
    check_rejoining(CONFIG, "bob", info("bob"), info("alice"), "digits-cnn")
    assert refusal(check_rejoining, CONFIG, "bob", info("bob", dataset="mnist"), info("alice"), "digits-cnn") == (
        "bob has dataset mnist, but the others has digits"
    )


def test_chosen_data_needs_a_validation_split_for_federated_evaluation() -> None:
    config = replace(CONFIG, federated_eval=True)
    assert refusal(chosen_data, config, "alice", info("alice", validation_size=0)) == (
        "alice holds no validation split, which --federated-eval needs; start it with --val-fraction above 0"
    )
    assert chosen_data(config, "eve", info("eve", "evaluator", validation_size=0)).validation_size == 0


def test_chosen_data_refuses_a_missing_data_set_key() -> None:
    config = replace(CONFIG, dataset_key="clinic")
    assert refusal(chosen_data, config, "alice", info("alice")) == (
        "alice has no data set clinic (its data sets: none); start it with --dataset-spec clinic=..."
    )
