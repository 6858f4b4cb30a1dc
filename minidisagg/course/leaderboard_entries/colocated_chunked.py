"""Reference entry: four colocated GPUs, each step all running decodes plus prefill chunks up to the token budget."""

from minidisagg.engine.scheduler import chunked

NAME = "colocated chunked"
PLACEMENT = (0, 4)
policy = chunked
