"""Errors a user can act on. The CLI prints them as one line and exits with code 2."""


class KimiVLError(Exception):
    """Base class: a problem with the user's input, files or settings (not a bug)."""


class CheckpointError(KimiVLError):
    """A checkpoint directory is missing files or its files disagree with each other."""


class UsageError(KimiVLError):
    """Bad command-line or API arguments."""


class ImageError(KimiVLError):
    """An image cannot be used (unreadable, or too large for the position tables)."""
