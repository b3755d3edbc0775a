"""The ``agent-factory-db`` command line: every command, its console helpers, and the demo.

`main` is the entry point; the schema, replicate, monitor, dashboard and demo
commands live beside it. The top layer: nothing else in the package imports it.
"""
