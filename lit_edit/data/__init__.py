"""lit_edit.data."""
