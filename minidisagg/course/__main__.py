"""``python -m minidisagg.course build ...``: the same as ``minidisagg course build ...``."""

from __future__ import annotations

import sys

from minidisagg.cli import main

if __name__ == "__main__":
    sys.exit(main(["course", *sys.argv[1:]]))
