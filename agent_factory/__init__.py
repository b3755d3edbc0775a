"""agent-factory: multi-provider PostgreSQL with bounded failover."""
