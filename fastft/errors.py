"""User-facing errors: the CLI prints these as one line and exits with code 2."""


class UserError(Exception):
    """Bad input from the user (config, files, flags). Printed without a traceback."""


class ConfigError(UserError, ValueError):
    """A config key or value is wrong; the message names the key, value and what was expected."""


class DataError(UserError, ValueError):
    """A data file is malformed; the message names the file (and line) and the problem."""


class TrainingDiverged(RuntimeError):
    """Training produced non-finite losses/gradients for too many steps in a row, or a tensor about
    to be saved is not finite. The CLI prints one line and exits with code 3; the last good
    checkpoint stays as it was."""
