"""Pluggable stages: prefill (prompt -> KV pages + first token) and decode (one token per step)."""

from minidisagg.stages.base import PrefillChunk, Stage, StageResult
from minidisagg.stages.decode import DecodeStage
from minidisagg.stages.prefill import PrefillStage

__all__ = ["DecodeStage", "PrefillChunk", "PrefillStage", "Stage", "StageResult"]
