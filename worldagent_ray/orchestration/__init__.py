"""Orchestration: the run folder and the asynchronous evolve driver."""
