"""The router process: a JSON-lines TCP front end over a disaggregated deployment."""

from __future__ import annotations

import argparse


def serve_router(args: argparse.Namespace) -> int:
    """Run the router role (see ``minidisagg serve --role router``)."""
    raise SystemExit("the standalone router role is not available yet; use LLM(mode='disagg') from Python")
