"""Evaluate an editor: ``python evaluate.py --config configs/<method>/<dataset>.yaml``."""

from lit_edit.cli import evaluate_main

if __name__ == "__main__":
    evaluate_main()
