"""Configuration dataclasses: the model's shape, the KV cache, and the engine's limits."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Optional


KV_WIRE_DTYPES = ("auto", "int8", "fp8_e4m3")  # how KV pages travel between workers (``kv/wire_quant.py``)
MAX_POSITION = 2**20  # the longest context a ModelConfig may declare (about a million tokens)


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style RoPE frequency scaling (``rope_type == "llama3"`` in HF configs)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family decoder-only transformer."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position: int = 8192
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    rope_scaling: Optional[RopeScaling] = None
    bos_token_id: int = 1
    eos_token_ids: tuple[int, ...] = (2,)

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                     "vocab_size", "max_position"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be an integer >= 1, got {value!r}")
        if self.max_position > MAX_POSITION:
            raise ValueError(f"ModelConfig.max_position must be at most {MAX_POSITION} tokens (its RoPE table alone "
                             f"would be max_position x head_dim floats), got {self.max_position}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
        for name in ("rope_theta", "rms_norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
                raise ValueError(f"ModelConfig.{name} must be a finite number > 0, got {value!r}")
        ids = [("bos_token_id", self.bos_token_id)] + [("eos_token_ids", t) for t in self.eos_token_ids]
        for name, token in ids:
            if not isinstance(token, int) or isinstance(token, bool) or token < 0:
                raise ValueError(f"ModelConfig.{name} must hold non-negative integer token ids, got {token!r}")

    @property
    def q_size(self) -> int:
        """Width of the query projection output."""
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of one of the key / value projection outputs."""
        return self.num_kv_heads * self.head_dim

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of K and V that one token occupies across all layers."""
        return 2 * self.num_layers * self.kv_size * dtype_bytes

    def num_params(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        h, f = self.hidden_size, self.intermediate_size
        per_layer = h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 3 * h * f + 2 * h
        emb = self.vocab_size * h
        return self.num_layers * per_layer + emb * (1 if self.tie_embeddings else 2) + h

    def fingerprint(self) -> str:
        """A short stable hash of the shape, used to refuse mismatched peers."""
        payload = json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


# Shapes of real models. The weights of "smollm2-135m" are real (GGUF); the others are
# random-weight presets of the published shapes, used where only speed matters.
SMOLLM2_135M = ModelConfig(
    name="smollm2-135m",
    num_layers=30,
    hidden_size=576,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    intermediate_size=1536,
    vocab_size=49152,
    max_position=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_embeddings=True,
    bos_token_id=1,
    eos_token_ids=(2,),
)

TINY = ModelConfig(
    name="tiny",
    num_layers=2,
    hidden_size=128,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    intermediate_size=256,
    vocab_size=49152,
    max_position=2048,
    rope_theta=10000.0,
    # untied: with random weights a tied head mostly echoes the last token (its embedding dominates the
    # residual), so greedy tokens would hardly depend on the context or the KV cache; untied they do
    tie_embeddings=False,
)

LLAMA_1B = ModelConfig(
    name="llama-1b",
    num_layers=16,
    hidden_size=2048,
    num_heads=32,
    num_kv_heads=8,
    head_dim=64,
    intermediate_size=8192,
    vocab_size=128256,
    max_position=131072,
    rope_theta=500000.0,
    tie_embeddings=True,
    rope_scaling=RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192),
    bos_token_id=128000,
    eos_token_ids=(128001, 128009),
)

LLAMA_8B = ModelConfig(
    name="llama-8b",
    num_layers=32,
    hidden_size=4096,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    intermediate_size=14336,
    vocab_size=128256,
    max_position=8192,
    rope_theta=500000.0,
    tie_embeddings=False,
    bos_token_id=128000,
    eos_token_ids=(128001, 128009),
)

PRESETS: dict[str, ModelConfig] = {c.name: c for c in (SMOLLM2_135M, TINY, LLAMA_1B, LLAMA_8B)}


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV pool: block size and how many blocks (or how much memory) it gets."""

    block_size: int = 16
    num_blocks: Optional[int] = None
    memory_budget_bytes: Optional[int] = None
    layout: Optional[str] = None  # "layer_major" or "block_major" (kv/cache.py); None: by device
    # Keep full blocks' KV after their request ends and share it with later prompts that start with
    # the same tokens (``kv/prefix_cache.py``), so their prefill computes only what is new.
    enable_prefix_caching: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching must be True or False, got {self.enable_prefix_caching!r}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.layout not in (None, "layer_major", "block_major"):
            raise ValueError(f"KV pool layout must be 'layer_major', 'block_major' or None, got {self.layout!r}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")

    def resolve_num_blocks(self, model: ModelConfig, dtype_bytes: int, default_budget_bytes: int) -> int:
        """How many blocks the pool holds: explicit count, else the memory budget divided by block bytes."""
        if self.num_blocks is not None:
            return self.num_blocks
        budget = self.memory_budget_bytes if self.memory_budget_bytes is not None else default_budget_bytes
        block_bytes = self.block_size * model.kv_bytes_per_token(dtype_bytes)
        num = budget // block_bytes
        if num < 1:
            raise ValueError(
                f"KV memory budget of {budget} bytes is smaller than one block ({block_bytes} bytes)"
            )
        return int(num)


def _check_seconds(owner: str, name: str, value: object, allow_zero: bool = False) -> None:
    """Raise ValueError unless ``value`` is a finite number of seconds > 0 (>= 0 with ``allow_zero``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{owner}.{name} must be a finite number of seconds {bound}, got {value!r}")


@dataclass(frozen=True)
class LinkConfig:
    """How disaggregated workers guard their links: KV leases, per-peer quotas, reconnects, output queues.

    A decode worker's KV reservation is a lease of ``kv_lease_s``: each chunk of pages (and the
    commit) renews it; one whose transfer makes no progress for that long is freed. One peer
    (one KV link) may hold at most ``max_reserved_share_per_peer`` of the decode pool in
    reservations; a peer holding none may always take one, so a request larger than the share
    still runs, alone. A broken prefill-to-decode link is re-established with exponential
    backoff (``reconnect_initial_s`` doubling up to ``reconnect_max_s``, jittered) until
    ``reconnect_deadline_s`` (0: never). Every output subscriber (a router on a worker, a
    client on a router) gets a queue of ``subscriber_queue_size`` messages; one that falls that
    far behind is dropped. A frame on a router link, or a client's JSON line on a router, must
    arrive whole within ``frame_deadline_s`` of its first byte, else its connection is dropped;
    each listening port serves at most ``max_connections`` connections at once (one thread
    each) and refuses more, saying why. ``kv_wire_dtype`` is how KV pages travel from prefill to
    decode: ``auto`` in the pool's dtype, ``int8`` or ``fp8_e4m3`` quantised per (block, KV head)
    and dequantised into the decode pool on arrival (``kv/wire_quant.py``); both sides must agree.
    """

    kv_lease_s: float = 30.0
    max_reserved_share_per_peer: float = 0.5
    reconnect_initial_s: float = 0.1
    reconnect_max_s: float = 5.0
    reconnect_deadline_s: float = 60.0
    subscriber_queue_size: int = 4096
    frame_deadline_s: float = 10.0
    max_connections: int = 256
    kv_wire_dtype: str = "auto"

    def __post_init__(self) -> None:
        _check_seconds("LinkConfig", "kv_lease_s", self.kv_lease_s)
        share = self.max_reserved_share_per_peer
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
            raise ValueError(f"LinkConfig.max_reserved_share_per_peer must be a fraction of the decode pool "
                             f"with 0 < share <= 1, got {share!r}")
        _check_seconds("LinkConfig", "reconnect_initial_s", self.reconnect_initial_s)
        _check_seconds("LinkConfig", "reconnect_max_s", self.reconnect_max_s)
        _check_seconds("LinkConfig", "reconnect_deadline_s", self.reconnect_deadline_s, allow_zero=True)
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise ValueError(f"LinkConfig.reconnect_max_s ({self.reconnect_max_s}) must be >= reconnect_initial_s "
                             f"({self.reconnect_initial_s})")
        size = self.subscriber_queue_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"LinkConfig.subscriber_queue_size must be an integer >= 1 (messages), got {size!r}")
        _check_seconds("LinkConfig", "frame_deadline_s", self.frame_deadline_s)
        cap = self.max_connections
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
            raise ValueError(f"LinkConfig.max_connections must be an integer >= 1 (connections per listening port), "
                             f"got {cap!r}")
        if self.kv_wire_dtype not in KV_WIRE_DTYPES:
            raise ValueError(f"LinkConfig.kv_wire_dtype must be one of {list(KV_WIRE_DTYPES)}, "
                             f"got {self.kv_wire_dtype!r}")


@dataclass(frozen=True)
class EngineConfig:
    """Scheduling limits and numerics switches of one engine."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    policy: str = "prefill_first"
    chunk_size: int = 256
    batch_invariant: bool = False
    max_model_len: Optional[int] = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    cuda_graphs: bool = True  # decode by CUDA graph replay where possible (CUDA + Triton kernels only)
    # Fresh prompts (or first chunks) of up to 2048 tokens by CUDA graph replay too, one graph per token
    # bucket (``engine/prefill_graphs.py``). Off by default: each bucket's capture costs memory and a stall.
    prefill_cuda_graphs: bool = False
    # Queue decode step n+1 on the device before step n's tokens reach the host, so the host's work
    # between steps overlaps the device's (vLLM's asynchronous scheduling). None: on where decode
    # runs by CUDA graphs, off elsewhere (on a CPU nothing runs in the background to overlap).
    async_scheduling: Optional[bool] = None
    # Batch-1 decode of a float32 or bfloat16 CPU model through one torch.compile graph of the model's own
    # code (needs a C++ compiler; without one the engine stays eager). Off by default: compiling takes tens of seconds.
    compile_cpu: bool = False
    # Opt-in accelerator: CPU decode steps through one C++ op, a copy of the stock model's step with no
    # Python between its ops (``accel/native_decode.py``). Off by default: the engine runs the model itself,
    # and the accelerator refuses to run (saying why) when the model is not the stock one.
    native_cpu_decode: bool = False
    link: LinkConfig = field(default_factory=LinkConfig)  # disaggregated workers only (``LinkConfig``)

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.async_scheduling not in (None, True, False):
            raise ValueError(f"async_scheduling must be True, False or None (on with CUDA graphs), "
                             f"got {self.async_scheduling!r}")
        if not isinstance(self.compile_cpu, bool):
            raise ValueError(f"compile_cpu must be True or False, got {self.compile_cpu!r}")
        if not isinstance(self.native_cpu_decode, bool):
            raise ValueError(f"native_cpu_decode must be True or False, got {self.native_cpu_decode!r}")
        if not isinstance(self.link, LinkConfig):
            raise ValueError(f"link must be a LinkConfig, got {type(self.link).__name__}")
