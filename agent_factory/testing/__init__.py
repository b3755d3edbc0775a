"""Real PostgreSQL for tests, benchmarks and the demo: embedded servers and a fault proxy.

`embedded` runs throwaway servers from the ``pgserver`` wheel; `faultproxy`
(with `faultlink`) injects real network faults between a client and a server;
`fleet` starts one server per provider (each behind a proxy if asked), the one
way every user here gets several.
Used by the tests, the benchmarks, the demo and the examples; the engine
never imports it.
"""
