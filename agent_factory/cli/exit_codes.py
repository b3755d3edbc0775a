"""The exit codes of every ``agent-factory-db`` command: one table.

=====  ===========  ==========================================================
code   name         meaning
=====  ===========  ==========================================================
0      OK           done (health: the primary is up; verify: schemas match)
1      FAILED       done, and the answer is no: the primary is down or a
                    backup's drain into it fails (health), a
                    migration failed, the schemas drifted, a copy was refused
2      USAGE        bad configuration or command-line argument, or a missing
                    installation (argparse exits 2 too); the message says how
                    to fix it
3      UNAVAILABLE  a provider cannot be reached, or lacks what the command
                    needs (pgvector)
130    INTERRUPTED  Ctrl-C
=====  ===========  ==========================================================
"""

from __future__ import annotations

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_UNAVAILABLE", "EXIT_USAGE"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130
