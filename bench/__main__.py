"""``python -m bench``: run the benchmarks (see ``bench.run``)."""

import sys

from bench.run import main

sys.exit(main())
