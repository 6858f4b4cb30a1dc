"""Reference entry: one prefill GPU (whole prompts first) feeding three decode GPUs."""

from minidisagg.engine.scheduler import prefill_first

NAME = "1P3D prefill_first"
PLACEMENT = (1, 3)
policy = prefill_first
