"""Entry point of ``python -m lit_edit.data`` (see :mod:`lit_edit.data.check`)."""

from lit_edit.data.check import main

if __name__ == "__main__":
    raise SystemExit(main())
