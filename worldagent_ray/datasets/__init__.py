"""Training data made from episodes: pure formatting and readers (the Ray Data shells live in runtime/)."""
