"""Real PostgreSQL for tests, benchmarks and the demo: embedded servers and a fault proxy.

`embedded` runs throwaway servers from the ``pgserver`` wheel; `faultproxy`
(with `faultlink`) injects real network faults between a client and a server.
Used by the tests, the benchmarks, the demo and the examples; the engine
never imports it.
"""
