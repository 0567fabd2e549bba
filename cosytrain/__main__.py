"""``python -m cosytrain``: see :mod:`cosytrain.cli`."""

from cosytrain.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
