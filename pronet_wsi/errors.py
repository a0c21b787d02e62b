"""The one exception type for bad user input; the CLI turns it into a one-line message."""


class InputError(ValueError):
    """Bad input from the user: the message names the file or parameter and the fix."""
