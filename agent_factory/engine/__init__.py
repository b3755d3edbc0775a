"""The failover engine: where a statement goes, and whether a provider is alive.

The decision core without I/O (`policy`, `failover`), the health of each
provider (`health`: breaker, probes, lag clock), the watchdog that abandons
calls without news, the providers' pools (`provider`, `async_provider`), the
events, and the settings (parsed once from arguments or the environment).
Imports nothing of the package above it (continuity, core, cli, ...).
"""
