"""``python -m asteria.bench``: the same as ``asteria-bench``."""

import sys

from . import main

sys.exit(main())
