"""Dataclasses to plain dicts, fast enough for every KV transfer and every streamed output.

``dataclasses.asdict`` deep-copies every element of every list: a sequence's state with a long
prompt takes milliseconds (``benchmarks/NOTES.md``, "DONE was slow to build"), on the critical
path of each KV hand-off (DONE) and of each request's submission. ``plain_dict`` copies containers one level deep instead, which is
enough for what crosses the wire here: lists of token ids or times, flat dicts of settings.
"""

from __future__ import annotations

import dataclasses
from typing import Any


def plain_value(value: Any) -> Any:
    """A dataclass as a dict (recursively), a list or dict copied one level deep, anything else as is."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain_dict(value)
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, dict):
        return dict(value)
    return value


def plain_dict(obj: Any) -> dict[str, Any]:
    """The fields of dataclass instance ``obj`` as a dict of plain values (see ``plain_value``).

    Lists and dicts are new containers, so later changes to ``obj`` do not show through; their
    elements are shared, which is safe for the numbers and strings they hold here.
    """
    return {f.name: plain_value(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
