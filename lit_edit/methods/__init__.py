"""lit_edit.methods."""
