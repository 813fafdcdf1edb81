"""Run the benchmark harness: ``python -m benchmarks --help`` lists the options."""

import sys

from benchmarks.harness import main

sys.exit(main())
