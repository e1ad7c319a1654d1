"""The wire protocol: a versioned msgpack envelope around frozen, self-validating messages.

No module here does I/O: they turn bytes into validated messages and back.
The package is layered, each module importing only those above it:

- :mod:`~syncfed.protocol.base`: the version, error codes, limits and field checks;
- :mod:`~syncfed.protocol.task_messages`: the task a request trains for and the metric sums it scores;
- :mod:`~syncfed.protocol.terms`: a job's terms, which a site's policy accepts or refuses;
- :mod:`~syncfed.protocol.messages`, :mod:`~syncfed.protocol.training_messages`,
  :mod:`~syncfed.protocol.queries`, :mod:`~syncfed.protocol.secagg_messages`: the messages;
- :mod:`~syncfed.protocol.unpacking`: msgpack decoding bounded by what it may cost;
- :mod:`~syncfed.protocol.envelope`: the envelope, the message kinds and the single-frame format;
- :mod:`~syncfed.protocol.streaming`: the streamed format, :func:`decode` and :class:`MessageDecoder`.

A message that fails its checks raises :class:`~syncfed.exceptions.LocalProtocolError`
when built here and :class:`~syncfed.exceptions.RemoteProtocolError` when decoded.
Import from here: the modules' layout may change, this package's names stay.
"""

from __future__ import annotations

from .base import ERROR_CODES, PROTOCOL_VERSION, Message
from .base import MAX_CLASSES as MAX_CLASSES
from .base import MAX_ID as MAX_ID
from .base import MAX_NAME as MAX_NAME
from .base import MAX_PLAN_SIZE as MAX_PLAN_SIZE
from .base import MAX_SHARD as MAX_SHARD
from .data_messages import DATA_KINDS, FEATURE_TYPES, DataPlan, DataSchema, Feature
from .envelope import REQUESTS, Envelope, Opened, encode, reply_kind
from .messages import DATA_SPLITS, DatasetInfo, Describe, Error, Hello, Info, ModelLayout, Ping, Pong
from .messages import MAX_DATASETS as MAX_DATASETS
from .messages import MAX_LAYOUT_TENSORS as MAX_LAYOUT_TENSORS
from .queries import MAX_BINS as MAX_BINS
from .queries import MAX_CELLS as MAX_CELLS
from .queries import MAX_FEATURES as MAX_FEATURES
from .queries import QUERIES, Query, QueryResult
from .secagg_messages import MAX_SESSION as MAX_SESSION
from .secagg_messages import (
    SecAggKeys,
    SecAggMask,
    SecAggMasked,
    SecAggShare,
    SecAggShares,
    SecAggStart,
    SecAggUnmask,
    SecAggUnmasked,
)
from .streaming import DEFAULT_CHUNK_SIZE, STREAM_MAGIC, MessageDecoder, Outgoing, Route, Sink, decode, encode_fragments
from .streaming import Buffer as Buffer
from .task_messages import LOSSES, METRICS, REGRESSION_SUMS, TASK_KINDS, Recipe
from .task_messages import MAX_CONFUSION_CLASSES as MAX_CONFUSION_CLASSES
from .task_messages import MAX_HIDDEN as MAX_HIDDEN
from .task_messages import MAX_HUBER_DELTA as MAX_HUBER_DELTA
from .task_messages import MAX_SCORE_BINS as MAX_SCORE_BINS
from .task_messages import MAX_WIDTH as MAX_WIDTH
from .task_messages import MIN_SCORE_BINS as MIN_SCORE_BINS
from .terms import DP_MODES, Accepted, Propose, Terms
from .training_messages import (
    COMPRESSIONS,
    EVAL_SPLITS,
    OPTIMIZERS,
    EvalResult,
    Evaluate,
    Fetch,
    Fit,
    FitHeld,
    FitResult,
    TrainingPlan,
)
from .training_messages import MAX_LOCAL_EPOCHS as MAX_LOCAL_EPOCHS
from .training_messages import MAX_WEIGHT_DECAY as MAX_WEIGHT_DECAY

# The names the single module syncfed/protocol.py exported, unchanged; the limits above are importable too.
__all__ = [
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

#: The old name of the bound on claimed example counts, kept for one release.
MAX_EXAMPLES = MAX_SHARD
