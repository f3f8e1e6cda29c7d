"""Metrics, per-image reports and the evaluation of prediction folders."""
