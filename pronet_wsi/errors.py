"""The one exception type for bad user input; the CLI turns it into a one-line message. Any other exception is
a bug, reported by :func:`bug_message`."""


class InputError(ValueError):
    """Bad input from the user: the message names the file or parameter and the fix."""


def bug_message(exc: BaseException, hint: bool = True) -> str:
    """One line for an unexpected exception (a bug, not bad input): its type and the first line of its message,
    and with ``hint`` where to find the traceback.

    >>> bug_message(IndexError("index 7 is out of bounds"))
    'internal error IndexError: index 7 is out of bounds (run with -v for the traceback)'
    """
    first = str(exc).splitlines()[0] if str(exc) else ""
    return (f"internal error {type(exc).__name__}{': ' + first if first else ''}"
            + (" (run with -v for the traceback)" if hint else ""))
