"""User-facing errors: raised for mistakes in inputs; the CLI prints the message without a traceback and exits 2."""


from typing import Optional


class PMFInputError(ValueError):
    """A bad input from the user (path, image, config key or value, shape); the message names the input.

    ``cli_message``: the message as a ``pmf`` command line user must read it, when that differs (it names a flag such
    as ``--allow-pickle`` where the message names the Python argument ``allow_pickle=True``); the CLI prints it.
    """

    def __init__(self, message: str = "", *, cli_message: Optional[str] = None):
        super().__init__(message)
        self.cli_message = cli_message
