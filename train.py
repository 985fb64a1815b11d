"""Train an editor: ``python train.py fit --config configs/<method>/<dataset>.yaml``."""

from lit_edit.cli import train_main

if __name__ == "__main__":
    train_main()
