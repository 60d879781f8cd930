"""User-facing errors: raised for mistakes in inputs; the CLI prints the message without a traceback and exits 2."""


class PMFInputError(ValueError):
    """A bad input from the user (path, image, config key or value, shape); the message names the input."""
