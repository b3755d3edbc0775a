"""DatabaseProvider on its own (the original API): one target, no failover."""

from __future__ import annotations

import pytest
from fleet import wait_until

from agent_factory.engine.provider import DatabaseProvider
from agent_factory.errors import HangTimeoutError, OutcomeUnknownError, ProviderUnavailableError
from agent_factory.testing.fleet import Fleet


def test_standalone_provider_queries_and_health(healthy_fleet: Fleet) -> None:
    member = healthy_fleet["neon"]
    provider = DatabaseProvider("neon", member.url)
    try:
        assert provider.execute_query("SELECT 1") == [(1,)]
        assert provider.execute_query("SELECT 2", fetch_mode="one") == (2,)
        assert provider.health_check() is True
        assert member.server.password not in repr(provider)
        with pytest.raises(ValueError, match="fetch_mode"):
            provider.execute_query("SELECT 1", fetch_mode="some")  # type: ignore[arg-type]
    finally:
        provider.close()
    assert not provider.pool_active


def test_standalone_provider_hang_and_crash(healthy_fleet: Fleet) -> None:
    member = healthy_fleet["neon"]
    provider = DatabaseProvider("neon", member.url)
    try:
        provider.execute_query("CREATE TABLE IF NOT EXISTS standalone_t (a int)", fetch_mode="none")
        member.server.hang()
        with pytest.raises(HangTimeoutError) as info:
            provider.execute_query("SELECT 1")
        assert info.value.provider == "neon"
        assert provider.health.up is False
        member.server.resume()
        wait_until(lambda: provider.health.up, timeout=20, message="neon back up")
        provider.execute_query("SELECT 1")
        member.server.hang()
        with pytest.raises(OutcomeUnknownError):
            provider.execute_query("INSERT INTO standalone_t VALUES (1)", fetch_mode="none")
        member.server.resume()
        member.server.kill()
        with pytest.raises(ProviderUnavailableError):
            provider.execute_query("SELECT 1")
    finally:
        provider.close()
        healthy_fleet.heal()
