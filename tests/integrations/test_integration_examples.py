"""The examples run: the RAG loop against the embedded servers; the FastAPI app compiles
(and serves its probes, metrics and chat when FastAPI is installed)."""

from __future__ import annotations

import importlib.util
import py_compile
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from databases import schema_databases

from agent_factory.core.async_database_manager import AsyncDatabaseManager
from agent_factory.core.database_manager import DatabaseManager
from agent_factory.testing.fleet import Fleet

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FAST = {"hang_timeout": 1.0, "probe_interval": 0.1, "checkout_timeout": 30.0}


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def urls(fleet: Fleet) -> Iterator[dict[str, str]]:
    with schema_databases(fleet, "rag", load("rag_loop").DIM) as made:
        yield made


def test_the_rag_loop_answers_from_the_right_documents(db: DatabaseManager) -> None:
    rag = load("rag_loop")
    results = rag.run(db)
    assert [sources[0] for _, _, sources in results] == ["pump-noise", "vfd-fault", "plc-reset"]
    assert "bearings" in results[0][1]
    assert rag.run(db) == results  # indexing again changes nothing


def test_the_fastapi_example_compiles() -> None:
    py_compile.compile(str(EXAMPLES / "fastapi_app.py"), doraise=True)


def test_the_fastapi_example_serves(healthy_fleet: Fleet, urls: dict[str, str]) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    app_module = load("fastapi_app")
    manager = AsyncDatabaseManager(urls, order=list(healthy_fleet.names), **FAST)
    with TestClient(app_module.create_app(manager)) as client:
        try:
            assert client.get("/healthz").status_code == 200
            assert client.get("/readyz").status_code == 200
            assert client.post("/chat/s1", json={"text": "hi"}).json()["reply"] == "You said: hi"
            assert [m["type"] for m in client.get("/chat/s1").json()] == ["human", "ai"]
            assert b"agent_factory" in client.get("/metrics/").content
        finally:
            # The pools live on the client's event loop: close them there.
            assert client.portal is not None
            client.portal.call(manager.close)
