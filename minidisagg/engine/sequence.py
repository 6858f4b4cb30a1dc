"""A request's life inside the engine: its tokens, KV progress, sampling state and timeline."""

from __future__ import annotations

import base64
import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from minidisagg.engine.sampling import SamplingParams
from minidisagg.engine.text_decoder import TextDecoder
from minidisagg.kv.block_manager import BlockManager
from minidisagg.metrics import RequestTimeline
from minidisagg.plain import plain_dict


class SequenceStatus(enum.Enum):
    """Where a sequence is: waiting for (more) prefill, decoding, or done."""

    WAITING = "waiting"
    RUNNING = "running"
    HANDED_OFF = "handed_off"  # prefilled; its KV is being shipped to a decode worker
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request being served.

    ``num_computed_tokens`` counts tokens whose KV is already in the cache. A waiting
    sequence needs tokens ``num_computed_tokens .. num_tokens - 1`` prefilled (all of them
    after a preemption, which frees the cache and recomputes); a running one has every
    token but the last in the cache, and each decode step computes that last token's KV
    and samples the next.
    """

    seq_id: int
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    timeline: RequestTimeline
    prompt: Optional[str] = None
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    blocks: Optional[BlockManager] = field(default=None, repr=False)  # the pool whose blocks hold this KV
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: Optional[str] = None
    num_preemptions: int = 0
    num_cached_tokens: Optional[int] = None  # prompt tokens whose KV came from the prefix cache (set at admission)
    generator: Optional[torch.Generator] = None
    text_decoder: Optional[TextDecoder] = None  # keeps the output text up to date; made on first use

    @property
    def block_table(self) -> list[int]:
        """This sequence's KV blocks in token order, as its pool's ``BlockManager`` holds them (read it only)."""
        return [] if self.blocks is None else self.blocks.block_table(self.seq_id)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by generated tokens."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prefill_tokens_left(self) -> int:
        """Tokens a waiting sequence still has to prefill before it can sample."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        """Whether generation has ended."""
        return self.status is SequenceStatus.FINISHED

    @property
    def last_token_id(self) -> int:
        """The newest token (the input of the next decode step)."""
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]


@dataclass
class SequenceState:
    """A sequence minus its KV pages: what a decode worker needs to continue a prefilled request.

    It travels with the pages (as a dict, JSON-friendly) and carries the sampler's generator
    state, so seeded sampling continues the same random stream after the hand-off. ``owner`` is
    the opaque token of the router that submitted the request, if it gave one: a decode worker
    sends the request's outputs to that router and lets no other router abort it.
    """

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    params: dict[str, Any]
    timeline: dict[str, Any]
    prompt: Optional[str] = None
    generator_state_b64: Optional[str] = None
    owner: Optional[str] = None
    num_cached_tokens: int = 0  # prompt tokens the prefill side took from its prefix cache

    @classmethod
    def of(cls, seq: Sequence) -> "SequenceState":
        """Snapshot a sequence."""
        gen = None
        if seq.generator is not None:
            gen = base64.b64encode(seq.generator.get_state().numpy().tobytes()).decode()
        return cls(seq.request_id, list(seq.prompt_token_ids), list(seq.output_token_ids),
                   plain_dict(seq.params), plain_dict(seq.timeline), seq.prompt, gen,
                   num_cached_tokens=seq.num_cached_tokens or 0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return plain_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SequenceState":
        """Inverse of ``to_dict``; raises ValueError naming a missing or extra field."""
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict):
            raise ValueError(f"state: a sequence state is an object, got {type(data).__name__}")
        unknown = sorted(str(k) for k in set(data) - names)
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                         and f.name not in data)
        if unknown or missing:
            raise ValueError(f"state: malformed sequence state: unknown field(s) {unknown}, missing {missing}; "
                             f"expected fields {sorted(names)}")
        return cls(**data)

    def sampling_params(self) -> SamplingParams:
        """The request's sampling parameters."""
        return SamplingParams(**self.params)

    def restore_timeline(self) -> RequestTimeline:
        """The request's timeline so far."""
        return RequestTimeline(**self.timeline)

    def restore_generator(self, device: torch.device) -> Optional[torch.Generator]:
        """The sampler's generator at the point of hand-off (None for greedy)."""
        if self.generator_state_b64 is None:
            return None
        gen = torch.Generator(device="cpu" if device.type == "cpu" else device)
        state = torch.frombuffer(bytearray(base64.b64decode(self.generator_state_b64)), dtype=torch.uint8)
        gen.set_state(state)
        return gen
