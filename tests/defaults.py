"""The provider order and the timings most test modules build their managers with.

The ``make_db`` fixture (conftest) takes a test module's ``ORDER`` and ``FAST``
as its defaults, so a module imports them from here, or defines its own and
says in a comment why it differs.
"""

from __future__ import annotations

from agent_factory.testing.fleet import PROVIDERS

#: The fleet's providers in the fleet's order: the primary ("supabase") first.
ORDER = list(PROVIDERS)

#: A failure is noticed within about a second (hang_timeout 1 s, probes every
#: 0.1 s). The checkout wait is long on purpose: a failover that waited for a
#: pooled connection of a dead server, instead of noticing it, would show as a
#: 30 s call, far past every bound the tests assert.
FAST = {"hang_timeout": 1.0, "probe_interval": 0.1, "checkout_timeout": 30.0}
