"""What the manager shows: Prometheus metrics and the live dashboard.

Listens to the managers' events and reads their stats; nothing below
(engine, continuity, core) imports it.
"""
