"""The one exception type users see: a bad input or setting, reported without a traceback."""


class SFTError(Exception):
    """A problem with the user's data or config. The message names the file, line or key."""
