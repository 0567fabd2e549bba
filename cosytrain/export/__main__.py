"""``python -m cosytrain.export``: the same as ``python -m cosytrain export``."""

from cosytrain.export import main

raise SystemExit(main())
