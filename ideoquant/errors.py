"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class IdeoquantError(Exception):
    """A user-facing failure: bad input, refused output, failed verification."""
