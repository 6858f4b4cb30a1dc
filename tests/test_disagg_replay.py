"""The course's models of disaggregation: a 1P1D replay on simulated clocks, and the layer-wise overlap pipeline."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from minidisagg.course.disagg_replay import link_from_handoffs, replay_disaggregated
from minidisagg.course.interference_lab import Scenario, run_scenario
from minidisagg.course.overlap_model import OverlapModel, per_layer_cost_s
from minidisagg.course.transfer_lab import LinkModel
from minidisagg.engine.step_cost import PREFILL, StepShape


@dataclass(frozen=True)
class FlatCosts:
    """A stand-in calibration: a prefill costs a fixed time plus a time per token, any decode step the same."""

    prefill_fixed_s: float = 0.005
    prefill_per_token_s: float = 0.0004
    decode_step_s: float = 0.002

    def cost_s(self, shape: StepShape) -> float:
        if shape.phase == PREFILL:
            return self.prefill_fixed_s + self.prefill_per_token_s * shape.num_tokens
        return self.decode_step_s


COSTS = FlatCosts()
SCENARIO = Scenario(num_decodes=3, decode_prompt_len=16, decode_output_len=12, num_long=2, long_prompt_len=100,
                    long_every_s=0.05, start_long_s=0.01, long_output_len=3, token_budget=128)
LINK = LinkModel("test link", 0.5, 0.002)


def timelines(run):
    return [(o.token_ids, o.timeline.token_times_s) for o in run.decodes + run.longs]


def test_disaggregated_decodes_never_wait_for_a_prefill(tiny_loaded):
    disagg = replay_disaggregated(tiny_loaded, SCENARIO, COSTS, LINK)
    colocated = run_scenario(tiny_loaded, SCENARIO, "prefill_first", costs=COSTS)
    long_prefill_s = COSTS.prefill_fixed_s + COSTS.prefill_per_token_s * SCENARIO.long_prompt_len
    assert max(colocated.decode_itl_s) >= long_prefill_s  # a decode sat through a whole prefill
    assert max(disagg.decode_itl_s) == pytest.approx(COSTS.decode_step_s)  # every gap is one decode step
    for o in disagg.decodes + disagg.longs:
        assert len(o.token_ids) == o.metrics.num_output_tokens  # every request finished, first token included
    assert [len(o.token_ids) for o in disagg.longs] == [SCENARIO.long_output_len] * SCENARIO.num_long


def test_the_hand_off_is_charged_its_link_time_after_the_prefill(tiny_loaded):
    disagg = replay_disaggregated(tiny_loaded, SCENARIO, COSTS, LINK)
    for o in disagg.decodes + disagg.longs:
        tl, m = o.timeline, o.metrics
        wire_s = LINK.seconds(m.kv_transfer_bytes, 1)
        assert tl.transfer_start_s == tl.prefill_end_s
        assert m.kv_send_s == pytest.approx(wire_s)
        assert tl.transfer_end_s >= tl.transfer_start_s + wire_s - 1e-12  # arrival, or the next step boundary
        assert tl.token_times_s[0] == tl.transfer_end_s
        assert m.ttft_s >= m.prefill_s + wire_s - 1e-12
    slow = replay_disaggregated(tiny_loaded, SCENARIO, COSTS, LinkModel("slow", 0.005, 0.002))
    assert slow.long_ttft_s > disagg.long_ttft_s  # a slower link delays the first tokens of long prompts


def test_the_replay_is_deterministic_given_its_calibration(tiny_loaded):
    assert timelines(replay_disaggregated(tiny_loaded, SCENARIO, COSTS, LINK)) == \
        timelines(replay_disaggregated(tiny_loaded, SCENARIO, COSTS, LINK))


def test_a_link_fitted_to_hand_offs_predicts_them():
    link = link_from_handoffs("fit", {1_000_000: 0.003, 9_000_000: 0.011})
    assert link.seconds(1_000_000) == pytest.approx(0.003, rel=1e-6)
    assert link.seconds(9_000_000) == pytest.approx(0.011, rel=1e-6)


@pytest.mark.parametrize("seed", range(20))
def test_overlap_saves_at_most_the_transfer_and_never_beats_either_phase(seed):
    rng = random.Random(seed)
    model = OverlapModel(rng.randint(1, 64), rng.choice([0.0, rng.uniform(0, 1e-3)]))
    prefill_s, nbytes = rng.uniform(1e-3, 1.0), rng.uniform(1e5, 1e9)
    link = LinkModel("l", rng.uniform(0.01, 400), rng.uniform(0, 1e-4))
    transfer_s = float(link.seconds(nbytes, 1))
    seq, lw = model.sequential_s(prefill_s, nbytes, link), model.layerwise_s(prefill_s, nbytes, link)
    assert seq == pytest.approx(prefill_s + transfer_s)
    assert seq - lw <= transfer_s + 1e-12
    assert lw >= max(prefill_s, float(link.seconds(nbytes, model.num_layers))) - 1e-12


def test_overlap_pays_near_transfer_equal_prefill_and_loses_with_nothing_to_hide():
    free = OverlapModel(32)
    assert free.speedup_at_ratio(0.05, 2.7e8, 1.0) == pytest.approx(2 / (1 + 1 / 32))
    assert free.speedup_at_ratio(0.05, 2.7e8, 1.0) > free.speedup_at_ratio(0.05, 2.7e8, 4.0) > 1.0
    costly = OverlapModel(32, per_layer_s=1e-4)
    assert costly.speedup_at_ratio(0.05, 2.7e8, 0.01) < 1.0
    assert per_layer_cost_s(0.100, 0.132, 32) == pytest.approx(1e-3)
    assert per_layer_cost_s(0.100, 0.090, 32) == 0.0
    with pytest.raises(ValueError):
        OverlapModel(0)
