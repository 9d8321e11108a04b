"""Evaluate a cohort and write metrics.csv, summary.json and report.html."""
