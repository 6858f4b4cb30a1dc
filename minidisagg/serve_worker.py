"""``python -m minidisagg.serve_worker MODEL --num-prefill P --num-decode D ...``: one worker per torchrun process.

See ``minidisagg.disagg.torchrun`` (and the README's two-node example).
"""

from __future__ import annotations

import sys

from minidisagg.disagg.torchrun import main

if __name__ == "__main__":
    sys.exit(main())
