"""A FastAPI chat service on the failover manager: lifespan, readiness probes and metrics.

    pip install 'agent-factory[langchain,dashboard]' fastapi
    uvicorn examples.fastapi_app:create_app --factory

Providers come from the environment (or ``.env``), as `AsyncDatabaseManager()`
reads them. The manager opens in the lifespan and closes with it; Kubernetes
probes ``/healthz`` (liveness) and ``/readyz`` (503 with a JSON reason when
no provider can take writes); Prometheus scrapes ``/metrics``. The chat
history is LangChain's, over the session memory, so a LangChain chain can
use it as is; the "model" here only echoes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from langchain_core.messages import AIMessage, HumanMessage
from pydantic import BaseModel

from agent_factory.core.async_database_manager import AsyncDatabaseManager
from agent_factory.integrations.langchain import SessionChatMessageHistory
from agent_factory.memory import AsyncPostgresMemoryStorage
from agent_factory.observability.health import health_app
from agent_factory.observability.metrics import instrument, metrics_asgi_app


class Turn(BaseModel):
    text: str


def create_app(db: AsyncDatabaseManager | None = None) -> FastAPI:
    """The application over ``db`` (by default one configured from the environment)."""
    manager = db if db is not None else AsyncDatabaseManager()
    storage = AsyncPostgresMemoryStorage(manager)
    metrics = instrument(manager)  # type: ignore[arg-type]  # reads stats both managers have

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await manager.open()
        try:
            yield
        finally:
            metrics.detach()
            if db is None:  # a manager passed in belongs to the caller
                await manager.close()

    app = FastAPI(lifespan=lifespan)

    def history(session_id: str) -> SessionChatMessageHistory:
        return SessionChatMessageHistory(session_id, async_storage=storage)

    @app.post("/chat/{session_id}")
    async def chat(session_id: str, turn: Turn) -> dict[str, str]:
        reply = f"You said: {turn.text}"
        await history(session_id).aadd_messages([HumanMessage(turn.text), AIMessage(reply)])
        return {"reply": reply, "served_by": manager.serving_provider or ""}

    @app.get("/chat/{session_id}")
    async def transcript(session_id: str) -> list[dict[str, str]]:
        messages = await history(session_id).aget_messages()
        return [{"type": m.type, "text": str(m.content)} for m in messages]

    app.mount("/metrics", metrics_asgi_app(metrics.registry))
    # Last: the routes above match first; /healthz and /readyz fall through to it.
    app.mount("/", health_app(manager))
    return app
