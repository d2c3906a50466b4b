"""Exceptions raised on bad user input.

Every message names the offending file (or folder) and says what was wrong with it, so that a user with a
thousand-case dataset can find and fix the one broken case without reading a traceback.
"""


class DataError(ValueError):
  """A dataset file or folder cannot be used as given.

  Attributes:
    path: the file or folder at fault (``None`` when the problem is not tied to one file).
    problem: what was wrong, without the path.
  """

  def __init__(self, path, problem):
    self.path = None if path is None else str(path)
    self.problem = problem
    super().__init__(f"{self.path}: {problem}" if self.path else problem)


class ConfigError(ValueError):
  """A config field (or the config file's argument) has a value that cannot be used.

  Attributes:
    field: the dotted field name(s) at fault, e.g. ``data.crop_size`` (or the config file for its argument).
    problem: what was wrong and what is allowed.
  """

  def __init__(self, field, problem):
    self.field = str(field)
    self.problem = problem
    super().__init__(f"{self.field}: {problem}")
