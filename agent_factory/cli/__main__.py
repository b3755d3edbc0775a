"""``python -m agent_factory.cli``: the same as the ``agent-factory-db`` command."""

import sys

from .main import main

sys.exit(main())
