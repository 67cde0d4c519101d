"""The two exceptions the CLI turns into exit codes (everything else is a bug, with its traceback)."""


class UserError(Exception):
    """A mistake in what the user gave us (a path, an option, a file's contents): not a bug.
    The CLI prints it as one line and exits 2."""


class ParityError(Exception):
    """A variant missed its parity threshold: the export is not trustworthy. Exit code 1."""
