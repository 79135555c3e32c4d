"""The error type for a user's input (a config value, a CSV, a task that does not fit the data).

The `manual-backprop` command prints a `ConfigError` as one line,
`manual-backprop: error: <message>`, and exits with status 2 as argparse does;
every other exception is a bug and keeps its traceback. It subclasses ValueError,
so code that caught ValueError before keeps working.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad user input to the tasks, data modules or CLI; the message says what to change."""


class InputFileNotFoundError(ConfigError, FileNotFoundError):
    """A file the user named does not exist (also a FileNotFoundError)."""
