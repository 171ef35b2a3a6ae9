"""User-facing errors: the CLI prints these as one line and exits with code 2."""


class UserError(Exception):
    """Bad input from the user (config, files, flags). Printed without a traceback."""


class ConfigError(UserError, ValueError):
    """A config key or value is wrong; the message names the key, value and what was expected."""


class DataError(UserError, ValueError):
    """A data file is malformed; the message names the file (and line) and the problem."""
