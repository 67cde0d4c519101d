"""The one exception type a user can cause. The CLI prints it as one line and exits 2."""


class UserError(Exception):
    """A mistake in what the user gave us (a path, an option, a file's contents): not a bug."""


class ParityError(Exception):
    """A variant missed its parity threshold: the export is not trustworthy. Exit code 1."""
