"""The one exception type rlparity raises for bad input, so callers can tell it from a bug."""


class RlparityError(ValueError):
    """Bad input or an unusable component, with a message that names what was expected and received."""
