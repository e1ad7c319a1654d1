"""A data plan's optional fields may be left off the wire: a plan without features or statistics decodes."""

from __future__ import annotations

from syncfed.protocol import DataPlan, Evaluate, decode, encode


def test_a_plan_without_features_or_statistics_round_trips() -> None:
    plan = DataPlan("arrays", (3,), ("a", "b"))
    assert set(plan.to_body()) == {"kind", "input_shape", "classes"}
    assert DataPlan.from_body(plan.to_body()) == plan
    request = Evaluate("mlp", {}, 8, data=plan)
    assert decode(encode(7, request)).message == request
