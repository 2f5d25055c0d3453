"""One error type for everything a person should read as one line, and
subclasses for the failures a caller tells apart (by type, never by text)."""


class MeshError(Exception):
    """A failure with a message fit for one line: what, where and the fix."""

    # A failure the agent's client tells apart crosses the control socket as
    # this code (control.py), and the client raises the same subclass again.
    code: str | None = None


class NoAgent(MeshError):
    """No agent answers on the control socket (none runs, or it stopped)."""


class NotAttached(MeshError):
    """`detach` of a pod that is not attached."""

    code = "not_attached"


CODES: dict[str, type[MeshError]] = {cls.code: cls for cls in (NotAttached,) if cls.code}
