"""The text of a growing list of output ids, without decoding the whole list every step.

Decoding a request's whole output each step costs O(n) per token, O(n^2) per request. A
byte-level BPE decoder (GPT-2, SmolLM2, Llama 3) maps each token to bytes, joins them and
decodes UTF-8, writing U+FFFD where bytes do not form a character. So once the bytes decoded
so far end in a complete character, the text of the whole list is that text plus the text of
the later ids alone, and only those need decoding. While a multi-byte character is unfinished
the text ends in U+FFFD and that point stays put.

Unlike ``models.tokenizer.IncrementalDetokenizer``, which streams new text and holds back
unfinished characters, this gives exactly what ``decode`` gives at every step (``RequestOutput.text``).
"""

from __future__ import annotations

from typing import Any, Sequence

from tokenizers import decoders

REPLACEMENT_CHAR = "\ufffd"


def decodes_bytewise(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` decodes token by token into bytes (so text can be decoded piecewise)."""
    backend = getattr(tokenizer, "backend", None)
    return isinstance(getattr(backend, "decoder", None), decoders.ByteLevel)


class TextDecoder:
    """Text of one sequence's output ids (special tokens skipped), equal to decoding them all at once.

    The ids may only grow between calls. Tokenizers that are not byte-level are decoded whole.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.incremental = decodes_bytewise(tokenizer)
        self._num_settled_ids = 0  # ids[:this] decode to ``_settled_text``, which ends in a whole character
        self._settled_text = ""
        self._num_ids = 0  # how many ids the last call had, and their text
        self._text = ""

    def text(self, ids: Sequence[int]) -> str:
        """The text of ``ids``, which extend the ids of the previous call."""
        if len(ids) == self._num_ids:
            return self._text
        if not self.incremental:
            self._text = self.tokenizer.decode(ids, skip_special_tokens=True)
        else:
            tail = self.tokenizer.decode(ids[self._num_settled_ids :], skip_special_tokens=True)
            self._text = self._settled_text + tail
            if not tail.endswith(REPLACEMENT_CHAR):
                self._num_settled_ids, self._settled_text = len(ids), self._text
        self._num_ids = len(ids)
        return self._text
