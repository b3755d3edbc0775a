"""Core database layer."""
