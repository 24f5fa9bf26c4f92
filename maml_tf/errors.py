"""The one exception type that reaches the user as a single line."""


class UserError(Exception):
    """Bad input from the user: a flag, a file or a directory.

    `main.py` prints `str(error)` as one line and exits with status 1, no traceback. The message
    names the flag or file and says what is wrong, e.g.
    `--data_dir=/x: images_background.zip is missing`.
    """
