"""Where cosytrain keeps its caches: ``$COSYTRAIN_HOME``, else ``~/.cache/cosytrain``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_home() -> Path:
    """The root of cosytrain's caches (the demo corpus, the data index); nothing in it is precious."""
    home = os.environ.get("COSYTRAIN_HOME")
    return Path(home) if home else Path.home() / ".cache" / "cosytrain"
