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
