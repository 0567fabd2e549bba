"""The exception that means "the user's input is wrong", so that front ends can tell it from a bug.

A :class:`ConfigurationError` is raised on purpose, by cosytrain's own checks, with a message that
names the thing (config key, path, ``file:line``) and the fix. The command-line front ends print it
as ONE line and exit with code 2. Every other exception is a bug or a failure of the environment
and keeps its full traceback (``python -m cosytrain fit`` exits 1 then). Set
``COSYTRAIN_TRACEBACK=1`` to print the traceback of a configuration error as well.

It is a ``ValueError`` so that callers which catch ``ValueError`` keep working. The specialised
errors (``DataError``, ``ModelDirError``, ``UpstreamConfigError``, ``SourceError``...) derive from it.
"""

from __future__ import annotations

import os

TRACEBACK_ENV = "COSYTRAIN_TRACEBACK"


class ConfigurationError(ValueError):
    """A mistake in a recipe, a command line, a path or an input file; the message is one line."""


def want_traceback() -> bool:
    """True when ``COSYTRAIN_TRACEBACK`` asks for tracebacks of configuration errors too."""
    return os.environ.get(TRACEBACK_ENV, "").strip().lower() not in ("", "0", "false", "no")
