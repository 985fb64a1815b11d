"""lit_edit.nn."""
