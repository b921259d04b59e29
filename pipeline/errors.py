"""Errors a user can cause, raised where the problem is found.

The CLI turns a `UserError` into one line on stderr and exit status 2; anything
else is a bug or an environment failure and exits with status 1.
"""


class UserError(Exception):
    """A problem with the user's input or options (exit status 2)."""


class OptionError(UserError):
    """A command-line option or configuration value is invalid."""


class CheckpointError(UserError):
    """The checkpoint directory is missing something or is inconsistent."""


class RunDirError(UserError):
    """The run directory cannot be used (locked, or made by another checkpoint)."""


class GGUFFormatError(UserError):
    """A GGUF file is truncated, corrupt, or uses something this reader cannot size."""


class ResumableFailure(Exception):
    """Something outside the input stopped the run (exit status 1, the message as one line); the run
    directory is kept, and rerunning the same command continues."""
