"""`python -m fastctx.benchmark ...`: the same as `fastctx bench ...`."""
import sys

from . import main

sys.exit(main())
