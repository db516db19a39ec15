"""``python -m kdistill ...`` is the ``kdistill`` command."""

from .cli import main

raise SystemExit(main())
