"""syncfed.protocol split into modules: its names stay those of the old single module, and its layers hold."""

from __future__ import annotations

import ast
from pathlib import Path

import syncfed.protocol
import syncfed.protocol.unpacking

PACKAGE = Path(syncfed.protocol.__file__).parent

#: ``syncfed/protocol.py``'s ``__all__`` before the split, in its order.
OLD_ALL = [
    "PROTOCOL_VERSION",
    "ERROR_CODES",
    "Message",
    "Hello",
    "DATA_SPLITS",
    "EVAL_SPLITS",
    "DatasetInfo",
    "Info",
    "Ping",
    "Pong",
    "COMPRESSIONS",
    "TrainingPlan",
    "Fit",
    "FitResult",
    "FitHeld",
    "Fetch",
    "Evaluate",
    "EvalResult",
    "Describe",
    "ModelLayout",
    "Error",
    "QUERIES",
    "Query",
    "QueryResult",
    "SecAggStart",
    "SecAggKeys",
    "SecAggShare",
    "SecAggShares",
    "SecAggMask",
    "SecAggMasked",
    "SecAggUnmask",
    "SecAggUnmasked",
    "Envelope",
    "REQUESTS",
    "reply_kind",
    "STREAM_MAGIC",
    "DEFAULT_CHUNK_SIZE",
    "Outgoing",
    "MessageDecoder",
    "Opened",
    "encode",
    "encode_fragments",
    "decode",
]
#: The old module's other public names, which syncfed's own modules and the tests import.
OLD_LIMITS = [
    "MAX_ID",
    "MAX_NAME",
    "MAX_CLASSES",
    "MAX_SHARD",
    "MAX_PLAN_SIZE",
    "MAX_DATASETS",
    "MAX_LAYOUT_TENSORS",
    "MAX_FEATURES",
    "MAX_BINS",
    "MAX_CELLS",
    "MAX_SESSION",
    "Buffer",
]
#: Each module imports only the modules before it.
LAYERS = [
    "base",
    "task_messages",
    "unpacking",
    "data_messages",
    "terms",
    "messages",
    "training_messages",
    "queries",
    "secagg_messages",
    "envelope",
    "streaming",
    "session_rules",
]


#: Names added since: the own-data schema and plan (docs/data.md), then the task and its metrics (issue 17),
#: then a job's terms for site policies (issue 19), then where a streamed message's tensors may go as they arrive
#: (issue 20).
NEW_ALL = [
    "DATA_KINDS",
    "FEATURE_TYPES",
    "DataSchema",
    "Feature",
    "DataPlan",
    "TASK_KINDS",
    "LOSSES",
    "Recipe",
    "OPTIMIZERS",
    "METRICS",
    "REGRESSION_SUMS",
    "DP_MODES",
    "Terms",
    "Propose",
    "Accepted",
    "Route",
    "Sink",
]


def test_the_package_exports_exactly_the_old_names_then_the_new() -> None:
    assert syncfed.protocol.__all__ == OLD_ALL + NEW_ALL
    for name in OLD_ALL + OLD_LIMITS:
        assert hasattr(syncfed.protocol, name), name


def sibling_imports(module: str) -> set[str]:
    """The package's modules that ``module`` imports, from its relative imports."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module} if node.module else {alias.name for alias in node.names}
    return found


def test_each_module_imports_only_the_layers_before_it() -> None:
    modules = sorted(path.stem for path in PACKAGE.glob("*.py") if path.stem != "__init__")
    assert sorted(LAYERS) == modules
    for index, module in enumerate(LAYERS):
        later = sibling_imports(module) - set(LAYERS[:index])
        assert not later, f"{module} imports {sorted(later)}, which come after it"
