"""``python -m scellst``: the same as the ``scellst`` command."""

from .cli import main

raise SystemExit(main())
