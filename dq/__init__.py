"""dq: a delay-queue server with HTTP callbacks over sharded Redis."""

from __future__ import annotations

__version__ = "0.3.0"
