"""syncfed: federated learning over asyncio websockets.

Workers keep their data; a coordinator sends them the model and a training
plan, aggregates their updates and has an evaluator score the result.
"""

from __future__ import annotations

from .exceptions import SyncfedError
from .protocol import PROTOCOL_VERSION

__all__ = ["SyncfedError", "PROTOCOL_VERSION", "__version__"]

__version__ = "0.1.0"
