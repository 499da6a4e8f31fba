"""
The errors that end a script with one `error: ...` line (cli.script turns
them into that line and an exit status).
"""


class UsageError(ValueError):
    """Flags a run cannot use: a bad value, or flags that contradict each other. Exit status 2."""

    exit_status = 2


class InputError(UsageError):
    """
    An input file (a checkpoint, its flags.json, a data folder, an npz) that is
    missing, malformed, or does not fit the flags given. Exit status 1.
    """

    exit_status = 1


class TrainingError(RuntimeError):
    """The run cannot usefully go on (for example, too many non-finite steps in a row). Exit status 1."""
