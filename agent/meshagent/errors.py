"""One error type for everything a person should read as one line, and
subclasses for the failures a caller tells apart (by type, never by text)."""


class MeshError(Exception):
    """A failure with a message fit for one line: what, where and the fix."""


class NoAgent(MeshError):
    """No agent answers on the control socket (none runs, or it stopped)."""
