"""CMEDL vs baselines over seeds on the phantoms: ``cmedl-experiment`` (runner) and its report."""
