"""Byte-level BPE tokenizer built from GGUF metadata or an HF directory, plus chat templates."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

from minidisagg.models.gguf_file import GGUFError, GGUFVersionError, NotGGUFError, read_metadata


class TokenizerError(ValueError):
    """A tokenizer could not be built from the given file, or was asked for something it lacks."""


# --- GGUF metadata -----------------------------------------------------------------------------


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """All key/value metadata of a GGUF file (v2 or v3) as plain Python values; tensors are not read."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"{path} is not a file; expected a .gguf model file")
    try:
        return read_metadata(path)
    except NotGGUFError as exc:
        raise TokenizerError(f"{path} is not a GGUF file: {exc}") from exc
    except GGUFVersionError as exc:
        raise TokenizerError(f"{path} is GGUF version {exc.version}; only versions 2 and 3 are supported") from exc
    except GGUFError as exc:
        raise TokenizerError(f"{path} has a corrupt or truncated GGUF header: {exc}") from exc


# --- pre-tokenizers, keyed by `tokenizer.ggml.pre` (the names llama.cpp writes) ------------------

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def _pre_tokenizer_for(pre: str) -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer the vocabulary was trained with, from the GGUF's `tokenizer.ggml.pre`."""
    gpt2_bytes = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's regex built in
    if pre in ("gpt2", "gpt-2"):
        return gpt2_bytes
    if pre in ("smollm", "starcoder", "refact", "codeshell", "command-r"):
        # Every digit is its own piece, then GPT-2's regex. This is llama.cpp's rule for these names
        # and what SmolLM2's own tokenizer.json says: Sequence[Digits(individual_digits), ByteLevel].
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2_bytes])
    split = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}.get(pre)
    if split is not None:  # the split regex, then bytes -> byte-alphabet characters only
        only_bytes = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"), only_bytes])
    raise TokenizerError(
        f"tokenizer.ggml.pre is {pre!r}, which minidisagg does not know how to pre-tokenize; "
        "supported: gpt2, smollm (and starcoder-like), llama-bpe, qwen2. Add its split regex in "
        "minidisagg/models/tokenizer.py, or load the model's HF directory with Tokenizer.from_hf_dir."
    )


_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def _raise_template_error(message: str) -> None:
    raise TokenizerError(f"the chat template rejected the messages: {message}")


def check_messages(messages: object) -> None:
    """Raise ``TokenizerError`` (a ``ValueError``) unless ``messages`` is a non-empty list of
    ``{"role": str, "content": str}`` dicts; the message says which message and which key is wrong."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TokenizerError(f"messages must be a non-empty list of {{'role': ..., 'content': ...}} dicts, "
                             f"got {messages!r:.80}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TokenizerError(f"message {i} must be a dict with 'role' and 'content', got {type(m).__name__}")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                got = "nothing" if key not in m else f"{type(m[key]).__name__} {m[key]!r:.40}"
                raise TokenizerError(f"message {i}: '{key}' must be a string, got {got}")


class Tokenizer:
    """Byte-level BPE tokenizer + chat template."""

    def __init__(self, backend: _Backend, chat_template: str | None = None, **special_tokens: str | None) -> None:
        """Wrap a `tokenizers.Tokenizer`; special_tokens are bos_token, eos_token, unk_token, pad_token."""
        self.backend = backend
        self.chat_template = chat_template
        self.special_tokens = {k: v for k, v in special_tokens.items() if v is not None}
        self._template: jinja2.Template | None = None

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """Build the tokenizer a GGUF file describes in its `tokenizer.*` metadata."""
        meta = read_gguf_metadata(path)
        kind = meta.get("tokenizer.ggml.model")
        if kind is None or "tokenizer.ggml.tokens" not in meta:
            found = sorted(k for k in meta if k.startswith("tokenizer.")) or "no tokenizer.* keys at all"
            raise TokenizerError(f"{path} has no tokenizer metadata (tokenizer.ggml.model/tokens); found: {found}")
        if kind != "gpt2":
            raise TokenizerError(
                f"{path} has tokenizer.ggml.model={kind!r}; minidisagg only builds 'gpt2' (byte-level BPE) "
                "tokenizers from GGUF. Load the model's HF directory with Tokenizer.from_hf_dir instead."
            )
        if "tokenizer.ggml.merges" not in meta:
            raise TokenizerError(f"{path} is a byte-level BPE GGUF without tokenizer.ggml.merges")
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        vocab = {token: index for index, token in enumerate(tokens)}
        merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
        backend = _Backend(models.BPE(vocab=vocab, merges=merges, unk_token=None, byte_fallback=False))
        backend.pre_tokenizer = _pre_tokenizer_for(meta.get("tokenizer.ggml.pre", "gpt2"))
        backend.decoder = decoders.ByteLevel()
        # Control tokens ('<|im_start|>') are matched whole in text and skippable when decoding;
        # user-defined ones ('<think>') are matched whole but always printed, as llama.cpp does.
        types = meta.get("tokenizer.ggml.token_type", [])
        backend.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == _CONTROL]
        )
        backend.add_tokens(
            [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
        )

        def token_at(key: str) -> str | None:
            index = meta.get(f"tokenizer.ggml.{key}")
            return tokens[index] if index is not None and 0 <= index < len(tokens) else None

        keys = {"bos_token": "bos", "eos_token": "eos", "unk_token": "unknown", "pad_token": "padding"}
        specials = {name: token_at(f"{key}_token_id") for name, key in keys.items()}
        bos = specials["bos_token"] if meta.get("tokenizer.ggml.add_bos_token") else None
        eos = specials["eos_token"] if meta.get("tokenizer.ggml.add_eos_token") else None
        if bos is not None or eos is not None:  # encode(add_special_tokens=True) adds them
            single = [t for t in (bos, "$A", eos) if t is not None]
            backend.post_processor = processors.TemplateProcessing(
                single=single, special_tokens=[(t, vocab[t]) for t in {bos, eos} if t is not None]
            )
        return cls(backend, meta.get("tokenizer.chat_template"), **specials)

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json (+ tokenizer_config.json / chat_template.jinja) from a local HF directory."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise TokenizerError(f"{path} has no tokenizer.json; expected a HF model or tokenizer directory")
        backend = _Backend.from_file(str(path / "tokenizer.json"))
        config: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
            if (path / name).is_file():
                config.update(json.loads((path / name).read_text(encoding="utf-8")))
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {entry.get("name"): entry.get("template") for entry in template}
            template = named.get("default", next(iter(named.values()), None))
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")

        specials = {k: config.get(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        specials = {k: v.get("content") if isinstance(v, dict) else v for k, v in specials.items()}  # AddedToken
        return cls(backend, template, **specials)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of text; special-token strings in it ('<|im_end|>') become their single ids."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of a sequence of ids (bytes that do not form a character decode as U+FFFD)."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True, tokenize: bool = True
    ) -> list[int] | str:
        """Render messages with the model's Jinja chat template; token ids unless tokenize=False."""
        check_messages(messages)
        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat template; format the prompt yourself")
        try:
            if self._template is None:  # HF renders with these settings; templates are written for them
                env = ImmutableSandboxedEnvironment(
                    trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
                )
                env.filters["tojson"] = lambda v, ensure_ascii=False, **kw: json.dumps(
                    v, ensure_ascii=ensure_ascii, **kw
                )
                env.globals["raise_exception"] = _raise_template_error
                env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
                self._template = env.from_string(self.chat_template)
            text = self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens
            )
        except jinja2.TemplateError as exc:
            raise TokenizerError(f"the chat template failed to render: {type(exc).__name__}: {exc}") from exc
        return self.encode(text) if tokenize else text

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        """Id of the beginning-of-sequence token, if the model has one."""
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        """Id of the end-of-sequence token, if the model has one."""
        return self._special_id("eos_token")

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The end-of-sequence id as a tuple (empty if none)."""
        return () if self.eos_token_id is None else (self.eos_token_id,)

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Ids that end generation: eos plus the chat end-of-turn token '<|im_end|>' if the vocab has it."""
        im_end = self.token_to_id("<|im_end|>")
        return tuple(dict.fromkeys([*self.eos_token_ids, *([] if im_end is None else [im_end])]))

    def token_to_id(self, token: str) -> int | None:
        """Id of a token spelled as in the vocabulary ('Ġthe', '<|im_start|>'), or None."""
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        """Vocabulary spelling of an id, or None if out of range."""
        return self.backend.id_to_token(i)

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.token_to_id(token)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, specials={self.special_tokens})"


class IncrementalDetokenizer:
    """Turns a growing list of ids into newly printable text, never splitting a UTF-8 character."""

    _CONTEXT_TOKENS = 5  # prompt tokens decoded along with the first new ones (spacing may depend on them)
    _MAX_CHAR_TOKENS = 4  # a UTF-8 character has at most 4 bytes, so at most 4 tokens

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True
    ) -> None:
        """Start after prompt_ids; push() each generated id."""
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_ids)
        self._read_offset = len(self.ids)  # ids before this have been returned as text
        self._prefix_offset = max(self._read_offset - self._CONTEXT_TOKENS, 0)

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes ('' if it ends mid-character)."""
        self.ids.append(token_id)
        pending = len(self.ids) - self._read_offset
        return self._emit(wait_for_char=pending < self._MAX_CHAR_TOKENS)

    def flush(self) -> str:
        """Return whatever is held back (an unfinished character decodes as U+FFFD)."""
        return self._emit(wait_for_char=False)

    def _emit(self, wait_for_char: bool) -> str:
        # Decode a small window twice -- up to what was already returned, and up to now -- and
        # return the difference; decoding single tokens would cut multi-byte characters apart.
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix_offset : self._read_offset], self.skip_special_tokens)
        after = decode(self.ids[self._prefix_offset :], self.skip_special_tokens)
        if after == before:  # nothing new (e.g. a skipped special token) and nothing held back
            self._read_offset = len(self.ids)
            return ""
        if len(after) < len(before) or (wait_for_char and after.endswith("\ufffd")):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        return after[len(before) :]


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Tokenizer for a .gguf model file or a HF directory holding tokenizer.json."""
    path = Path(path)
    if path.is_dir():
        return Tokenizer.from_hf_dir(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return Tokenizer.from_gguf(path)
    what = "does not exist" if not path.exists() else "is neither a .gguf file nor a directory"
    raise TokenizerError(f"{path} {what}; pass a .gguf model file or a HF directory with tokenizer.json")
