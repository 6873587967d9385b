"""WorldAgent-Ray."""
