"""Pluggable stages: prefill (prompt -> KV pages + first token) and decode (one token per step)."""

from minidisagg.engine.batch import PrefillChunk
from minidisagg.stages.async_decode import AsyncDecodeStage
from minidisagg.stages.base import Stage, StageResult
from minidisagg.stages.decode import DecodeStage
from minidisagg.stages.prefill import PrefillStage

__all__ = ["AsyncDecodeStage", "DecodeStage", "PrefillChunk", "PrefillStage", "Stage", "StageResult"]
