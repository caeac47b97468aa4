"""Scripts run in other environments (AutoGluon's own venv)."""
