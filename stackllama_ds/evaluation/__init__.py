"""Evaluation figures: statistics with intervals, the summary of a model set, the run report."""
