"""``agent-factory-db demo``: three embedded providers and a live failover, on screen."""
