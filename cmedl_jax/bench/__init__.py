


def repository_file(*parts):
  """A file of the repository this package runs from (e.g. ``configs/quickstart.py``), which benchmarks that start
  ``cmedl-train`` need: an editable install has it, a wheel does not (a FileNotFoundError naming the path)."""
  import os

  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # cmedl_jax/bench/ -> root
  path = os.path.join(root, *parts)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: this benchmark needs the repository's files (an editable install)")
  return path
