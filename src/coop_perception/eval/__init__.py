"""Evaluation: AP, sweeps, plots and reports."""
