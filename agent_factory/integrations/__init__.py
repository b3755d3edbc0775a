"""Adapters to the tools applications already use, each behind its own extra.

`integrations.langchain` (``[langchain]``): a chat history over the session
memory and a vector store over the knowledge store. `integrations.sqlalchemy`
(``[sqlalchemy]``): an engine that follows the manager's failover. They
build on the public API (`core`, `memory`) only; importing this package
imports neither framework. See docs/integrations.md.
"""
