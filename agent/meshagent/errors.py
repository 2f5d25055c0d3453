"""One error type for everything a person should read as one line."""


class MeshError(Exception):
    """A failure with a message fit for one line: what, where and the fix."""
