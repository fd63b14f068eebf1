"""Evaluation: model cost profiles, teacher-vs-student comparison (and face verification, see kdx.metrics.verification)."""
from kdx.eval.compare import compare_classifiers, format_table, plot_comparison, print_table, write_comparison
from kdx.eval.profile import count_macs, profile_model, weights_size_bytes

__all__ = ["compare_classifiers", "count_macs", "format_table", "plot_comparison", "print_table", "profile_model",
           "weights_size_bytes", "write_comparison"]
