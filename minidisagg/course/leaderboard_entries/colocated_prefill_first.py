"""Reference entry: four colocated GPUs, each starting new prompts at once (decodes wait while any prompt waits)."""

from minidisagg.engine.scheduler import prefill_first

NAME = "colocated prefill_first"
PLACEMENT = (0, 4)
policy = prefill_first
