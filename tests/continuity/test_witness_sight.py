"""The witness's reading of a backup (no I/O): what counts as a sign of the primary's life."""

from __future__ import annotations

from agent_factory.continuity.witness import Sight


def test_a_moving_heartbeat_is_news_and_a_still_one_goes_quiet() -> None:
    sight = Sight()
    sight.see(True, (1, None), now=0.0)
    sight.see(True, (1, None), now=4.0)
    assert sight.quiet_for(5.0) == 5.0
    sight.see(True, (2, None), now=6.0)
    assert sight.quiet_for(7.0) == 1.0


def test_messages_of_a_long_transaction_are_news_while_the_heartbeat_waits_behind_it() -> None:
    sight = Sight()
    sight.see(True, (7, "10:00:00.1"), now=0.0)
    sight.see(True, (7, "10:00:02.0"), now=2.0)
    sight.see(True, (7, "10:00:04.0"), now=4.0)
    assert sight.quiet_for(4.5) == 0.5


def test_a_worker_entering_or_leaving_a_transaction_is_no_news() -> None:
    # Leaving: the watcher ended a worker stuck in a hung primary's transaction;
    # that must not restart the quiet time (the failover would wait twice).
    sight = Sight()
    sight.see(True, (7, "10:00:00.1"), now=0.0)
    sight.see(True, (7, None), now=3.0)
    assert sight.quiet_for(3.5) == 3.5
    sight.see(True, (7, "10:00:05.0"), now=5.0)
    assert sight.quiet_for(5.5) == 5.5
