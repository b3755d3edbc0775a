"""The benchmarks of agent_factory: a package run from the repository root.

    python -m bench [--quick] [--suite core|resilience|continuity|memory|metrics|all]
    python3 dev.py bench [--quick] [--suite ...]

``bench.run`` is the entry point (arguments, the core suite, the report file);
``bench.overhead`` and ``bench.failover`` measure the core suite, and
``bench.resilience``, ``bench.continuity``, ``bench.memory`` and
``bench.metrics`` one suite each (each also runs alone with ``python -m
bench.NAME``). The servers come from ``agent_factory.testing.fleet``;
``bench.common`` holds what the suites share (servers, paced threads, faults,
measured series) and ``bench.report`` the Markdown format helpers.
"""
