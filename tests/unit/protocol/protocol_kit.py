"""What the wire protocol's tests share: every message kind, a plan's body, a small fit request,
and the strategy of request ids."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from syncfed.protocol import MAX_ID, Fit, TrainingPlan

__all__ = ["KINDS", "plan_body", "request_ids", "small_fit"]

KINDS = {
    "hello",
    "info",
    "ping",
    "pong",
    "fit",
    "fit_result",
    "fit_held",
    "fetch",
    "evaluate",
    "eval_result",
    "describe",
    "model_layout",
    "error",
    "query",
    "query_result",
    "secagg_start",
    "secagg_keys",
    "secagg_share",
    "secagg_shares",
    "secagg_mask",
    "secagg_masked",
    "secagg_unmask",
    "secagg_unmasked",
    "propose",
    "accepted",
}


def plan_body(**changes: object) -> dict[str, object]:
    return {"round": 1, "batch_size": 32, "num_batches": 10, "lr": 0.01, "seed": 0, **changes}


request_ids = st.integers(0, MAX_ID)


def small_fit() -> Fit:
    return Fit(
        "digits-cnn",
        {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(3, dtype=np.int64)},
        TrainingPlan(round=1, batch_size=32, num_batches=10, lr=0.01, seed=0),
    )
