"""The errors a user can act on, kept apart from bugs.

``main.py`` prints a ``UserError`` as one line (what, where, what to do) and exits 1;
any other exception is a bug and keeps its traceback. The subclasses also derive from
the built-in type a caller would expect (``ValueError``, ``FileNotFoundError``, ...).
"""


class UserError(Exception):
  """A problem with the input (config, data, workdir) that the user can fix."""


class ConfigError(UserError, ValueError):
  """A config field has a value that cannot work; the message names the field."""


class DataError(UserError, ValueError):
  """The data set cannot be read as configured (empty folders, unknown classes, ...)."""


class NotFoundError(UserError, FileNotFoundError):
  """A data set, folder, file or checkpoint the user named does not exist (or is not
  prepared)."""


class OutputError(UserError, OSError):
  """An output the user asked for (an export, a predictions CSV) cannot be written there."""


class TrainingError(UserError, RuntimeError):
  """Training cannot go on (divergence, an incompatible checkpoint, an unwritable workdir)."""
