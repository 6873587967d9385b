"""Agent cores: pure prompting, parsing and decision logic (no Ray)."""
