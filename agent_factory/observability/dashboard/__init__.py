"""A web dashboard for a `DatabaseManager`: health, roles, latency, failovers, operator actions.

    from agent_factory.observability.dashboard import create_app
    app = create_app(db, token="...")        # a Starlette app; serve it with uvicorn

Or from the command line: ``agent-factory-db dashboard [--demo]``. Needs the
``dashboard`` extra (``pip install 'agent-factory[dashboard]'``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import create_app

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    # Starlette and prometheus_client load on first use, not with the package.
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
