"""`python -m fastctx ...` runs the `fastctx` command (fastctx.cli)."""
import sys

from .cli import main

sys.exit(main())
