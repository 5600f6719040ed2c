"""Evaluation: classifier scores, FID, distributed sampling and the s/img measurement (imports the floors below it)."""
