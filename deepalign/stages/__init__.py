"""Stages of a run; each takes the run context, writes its artifacts and returns its metrics."""
