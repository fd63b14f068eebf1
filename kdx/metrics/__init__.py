"""Metrics the training modules log and the evaluations report: face verification (k-fold accuracy, TAR@FAR)."""
