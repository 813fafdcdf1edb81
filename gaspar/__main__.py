"""Run the gaspar command line: ``python -m gaspar``."""

from gaspar.cli import main

raise SystemExit(main())
