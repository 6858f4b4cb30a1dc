"""Stages are pluggable, and workloads replay through the engine with sane per-request timelines."""

from __future__ import annotations

from conftest import make_engine, run_all
from minidisagg.config import CacheConfig, EngineConfig
from minidisagg.engine.clock import SimulatedClock
from minidisagg.engine.llm_engine import LLMEngine
from minidisagg.engine.replay import replay
from minidisagg.engine.sampling import SamplingParams
from minidisagg.stages import DecodeStage, PrefillStage, StageResult
from minidisagg.workload import Fixed, Uniform, load_csv, poisson_workload, save_csv


class CountingDecode(DecodeStage):
    """A user stage: wraps the stock decode and counts the tokens it produced."""

    calls = 0
    tokens = 0

    def run(self, work):
        result: StageResult = super().run(work)
        CountingDecode.calls += 1
        CountingDecode.tokens += result.num_tokens
        return result


def test_custom_stage_subclass_is_used_and_output_unchanged(tiny_loaded):
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    stock = make_engine(tiny_loaded, batch_invariant=True)
    ref_ids = [stock.add_request({"prompt_token_ids": p}, params) for p in prompts]
    ref = run_all(stock)
    custom = LLMEngine(tiny_loaded, EngineConfig(batch_invariant=True), decode_stage=CountingDecode,
                       prefill_stage=PrefillStage)
    ids = [custom.add_request({"prompt_token_ids": p}, params) for p in prompts]
    out = run_all(custom)
    assert [out[i].token_ids for i in ids] == [ref[i].token_ids for i in ref_ids]
    assert CountingDecode.calls > 0 and CountingDecode.tokens == 2 * (6 - 1)  # first token comes from prefill


def test_poisson_and_csv_workloads_replay(tiny_loaded, tmp_path):
    workload = poisson_workload(rate_rps=50.0, num_requests=12, prompt_len=Uniform(4, 40), output_len=Fixed(5), seed=3)
    save_csv(workload, tmp_path / "w.csv")
    loaded_back = load_csv(tmp_path / "w.csv")
    assert loaded_back == workload
    engine = LLMEngine(tiny_loaded, EngineConfig(policy="chunked", max_num_batched_tokens=32,
                                                 cache=CacheConfig(num_blocks=64)), clock=SimulatedClock())
    outs = replay(engine, loaded_back, seed=1)
    assert [len(o.token_ids) for o in outs] == [5] * 12
    for req, out in zip(workload, outs):
        tl = out.timeline
        assert tl.arrival_s == req.arrival_s
        assert tl.arrival_s <= tl.scheduled_s <= tl.prefill_start_s <= tl.prefill_end_s <= tl.token_times_s[0]
        assert tl.token_times_s == sorted(tl.token_times_s) and tl.finish_s >= tl.token_times_s[-1]
        assert out.metrics.ttft_s >= out.metrics.prefill_s > 0
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
