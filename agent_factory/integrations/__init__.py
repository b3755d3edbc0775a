"""Adapters to the tools applications already use (reserved: none yet).

Planned here: health endpoints for Kubernetes, LangChain memory and vector
store, SQLAlchemy. They build on the public API (`core`, `memory`) only.
"""
