"""Data sets for training the Action agent (pure formatting: no Ray, no TRL)."""
