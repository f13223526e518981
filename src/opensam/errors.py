"""User-facing errors: one line that names the file and the problem, never a traceback."""


class InputError(Exception):
    """Bad user input (a file, a param, a checkpoint). The message is one line: 'path: problem'."""
