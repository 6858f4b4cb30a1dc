"""``minidisagg course leaderboard``'s arguments, read before the replay machinery (and torch) is imported."""

from __future__ import annotations

import argparse
from typing import Sequence


def main(argv: Sequence[str]) -> int:
    """``minidisagg course leaderboard SUBMISSION.py [--json PATH]``: 0 ranked, 2 a bad submission."""
    parser = argparse.ArgumentParser(prog="minidisagg course leaderboard",
                                     description="Rank a scheduling policy and a prefill/decode split by replayed "
                                                 "goodput per GPU against the reference entries, under fixed rules.")
    parser.add_argument("submission", nargs="?", help="a .py file defining NAME, PLACEMENT and policy "
                                                      "(omit it to rank the reference entries alone)")
    parser.add_argument("--json", dest="json_path", help="also write the rules and the ranking here")
    args = parser.parse_args(list(argv))
    from minidisagg.course.leaderboard import run_command

    return run_command(args.submission, args.json_path)
