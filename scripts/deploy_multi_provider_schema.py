#!/usr/bin/env python3
"""Deploy, verify and copy the agent-factory schema across the configured providers.

    python scripts/deploy_multi_provider_schema.py --provider neon
    python scripts/deploy_multi_provider_schema.py --all
    python scripts/deploy_multi_provider_schema.py --verify
    python scripts/deploy_multi_provider_schema.py --dry-run --embedding-dim 768
    python scripts/deploy_multi_provider_schema.py copy --from supabase --to neon

The same as ``agent-factory-db schema ...``; see agent_factory/cli/schema_command.py.
"""

from __future__ import annotations

import sys

from agent_factory.cli.schema_command import main

if __name__ == "__main__":
    sys.exit(main())
