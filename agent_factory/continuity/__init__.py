"""Continuity across an outage: replication between providers, lag, and failback.

Logical replication setup and status (`replication`, `subscription`), the
reconciliation of rows written on a backup (`reconcile`) and the failback
that runs it before the primary takes traffic again (`failback`). Builds on
the engine; the managers in `core` wire the two together.
"""
