"""Evaluation on held-out locations: methods, locations, the run loop, reports."""
