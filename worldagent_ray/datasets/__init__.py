"""Training data formatting (pure cores: no Ray); Ray Data shells live in ``runtime/``."""
