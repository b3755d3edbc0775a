"""``python -m agent_factory``: the same as the ``agent-factory-db`` command."""

import sys

from .cli.main import main

sys.exit(main())
