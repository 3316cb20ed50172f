"""``python -m asteria.train``: same as the ``asteria-train`` command."""

from asteria.train.cli import main

raise SystemExit(main())
