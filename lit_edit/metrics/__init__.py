"""lit_edit.metrics."""
