"""lit_edit.world."""
