"""dq: a delay-queue server with HTTP callbacks over sharded Redis."""

from __future__ import annotations

# The package version: pyproject.toml reads it from here (dynamic), callbacks send it in
# their User-Agent and `dq-master --version` prints it.
__version__ = "0.3.0"
