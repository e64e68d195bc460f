"""The one exception type that the CLI turns into a one-line message and a non-zero exit."""


class UserError(Exception):
    """Bad input from the user: a message that names the input and the fix.

    The CLI prints ``error: <message>`` on one line and exits with status 2; no traceback.
    Raise it before anything is written, so a refused command leaves nothing behind.
    """
