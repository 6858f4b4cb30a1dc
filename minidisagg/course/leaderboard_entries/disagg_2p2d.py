"""Reference entry: two prefill GPUs (whole prompts first) feeding two decode GPUs."""

from minidisagg.engine.scheduler import prefill_first

NAME = "2P2D prefill_first"
PLACEMENT = (2, 2)
policy = prefill_first
