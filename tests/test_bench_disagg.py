"""``minidisagg bench disagg``: the CPU smoke run end to end, replica routing, and device pinning errors."""

from __future__ import annotations

import json
import math
import random

import pytest

from conftest import token_prompts
from minidisagg import LLM, SamplingParams
from minidisagg.bench import disagg_sweep
from minidisagg.bench.disagg import main
from minidisagg.bench.disagg_result import join_requests, requests_path, split_requests
from minidisagg.bench.disagg_sweep import Sweep, attainment_of, point_goodput, refinement_rate, workloads
from minidisagg.config import CacheConfig, EngineConfig
from minidisagg.disagg.placement import check_dist_placement, check_placement, placement
from minidisagg.disagg.replicas import ReplicaCluster
from minidisagg.metrics import SLO, goodput

CONFIGS = {"colocated-prefill_first", "colocated-chunked", "disagg-overlap", "disagg-no-overlap"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("disagg-smoke")
    seed = random.SystemRandom().randrange(1 << 16)
    # a budget a loaded machine cannot exhaust, so every sweep runs (the smoke default is 45 s)
    assert main(["--smoke", "--out", str(out), "--seed", str(seed), "--time-budget-s", "600"]) == 0
    (json_path,) = out.glob("disagg-cpu-*.json")
    summary, raw = json.loads(json_path.read_text()), json.loads(requests_path(json_path).read_text())
    return join_requests(summary, raw), out, seed


def test_itl_timelines_say_which_panels_have_no_timeline(smoke):
    import copy

    import matplotlib.pyplot as plt

    from minidisagg.bench.disagg_plots import TIMELINE_CONFIGS, itl_timelines_figure

    result = copy.deepcopy(smoke[0])
    sweeps = result["models"]["tiny"]["sweeps"]
    stopped = next(s for s in sweeps if s["config"] == "colocated-chunked")
    stopped["timelines"] = []  # as when attainment fell before the fixed rate
    missing = next(s for s in sweeps if s["config"] == "disagg-overlap" and s["workload"] != stopped["workload"])
    sweeps.remove(missing)
    fig = itl_timelines_figure(result)
    texts = {ax.get_title(): " ".join(t.get_text() for t in ax.texts) for ax in fig.axes}
    plt.close(fig)
    workloads = sorted({s["workload"] for s in sweeps})
    assert len(texts) == len(workloads) * len(TIMELINE_CONFIGS)
    assert "the sweep stopped below it" in texts[f"tiny {stopped['workload']}: colocated-chunked"]
    assert "not run" in texts[f"tiny {missing['workload']}: disagg-overlap"]
    drawn = [title for title, text in texts.items() if not text]
    assert f"tiny {stopped['workload']}: colocated-prefill_first" in drawn and len(drawn) == len(texts) - 2


def test_smoke_writes_the_whole_schema(smoke):
    result, out, seed = smoke
    stem = next(out.glob("disagg-cpu-*.json")).stem
    for suffix in (".md", "-attainment.png", "-itl-timeline.png", "-ttft-breakdown.png"):
        assert (out / f"{stem}{suffix}").stat().st_size > 0, suffix
    assert result["errors"] == [] and not result["models"]["tiny"].get("skipped_sweeps"), f"seed {seed}"
    res = result["models"]["tiny"]
    assert {s["config"] for s in res["sweeps"]} == CONFIGS
    assert {s["workload"] for s in res["sweeps"]} == {"chat", "summarization"}
    assert "Goals" in (out / f"{stem}.md").read_text()


def test_smoke_summary_leaves_the_per_request_data_to_its_raw_file(smoke):
    result, out, _ = smoke
    json_path = next(out.glob("disagg-cpu-*.json"))
    text = json_path.read_text()
    assert "requests_ttft_tpot_s" not in text and '"timelines"' not in text and '"token_times_s"' not in text
    summary, raw = json.loads(text), json.loads(requests_path(json_path).read_text())
    assert split_requests(result) == (summary, raw)
    point = summary["models"]["tiny"]["sweeps"][0]["points"][0]
    assert {"num_requests", "num_failed", "failures", "attainment", "ttft_p99_s", "itl_p99_s"} <= set(point)
    assert "minidisagg_commit" in summary["machine"] and summary["card"] and summary["date"]


def test_smoke_attainment_and_goodput_are_consistent(smoke):
    result, _, seed = smoke
    for sweep in result["models"]["tiny"]["sweeps"]:
        points = sweep["points"]
        assert points, f"seed {seed}: {sweep['config']} {sweep['workload']} measured nothing"
        rates = [p["rate_rps"] for p in points]
        assert rates == sorted(rates)
        slo = SLO(**sweep["slo"])
        for p in points:
            assert 0.0 <= p["attainment"] <= 1.0
            assert p["num_finished"] <= p["num_requests"] == len(p["requests_ttft_tpot_s"])
            assert math.isclose(attainment_of(p, slo), p["attainment"])  # recomputed from the stored requests
        # monotone-ish: load does not make things much better
        assert points[-1]["attainment"] <= points[0]["attainment"] + 0.5, f"seed {seed}: {sweep}"
        expected = goodput(rates, [p["attainment"] for p in points])
        assert math.isclose(sweep["goodput_rps"], expected), f"seed {seed}"
        assert math.isclose(sweep["goodput_per_gpu_rps"], expected / 2)


def test_smoke_measures_the_kv_link_and_greedy_equality(smoke):
    result, _, seed = smoke
    res = result["models"]["tiny"]
    assert "greedy_check" in res, f"seed {seed}: no greedy check; errors {result['errors']}"
    assert res["greedy_check"]["equal"] is True, f"seed {seed}: {res['greedy_check']}"
    probe, ceiling = res["kv_probe"], res["kv_ceiling"]
    assert probe["kv_bytes"] == ceiling["kv_bytes"] > 0
    assert probe["achieved_GBps"] > 0 and ceiling["per_layer_GBps"] > 0 and ceiling["one_message_GBps"] > 0
    disagg = [s for s in res["sweeps"] if s["config"].startswith("disagg")]
    for sweep in disagg:
        point = sweep["points"][0]
        assert point["kv_bytes_per_request_median"] > 0
        assert point["breakdown_median_s"]["transfer_s"] is not None
    colocated = [s for s in res["sweeps"] if s["config"].startswith("colocated")]
    assert all(s["points"][0]["kv_bytes_per_request_median"] is None for s in colocated)
    assert any(s["timelines"] for s in res["sweeps"]), "no ITL timeline was recorded"
    assert len(result["goals"]) == 3


def test_goodput_of_points_uses_metrics_goodput():
    rng = random.Random()
    rates = sorted(rng.sample(range(1, 50), 5))
    attainments = sorted((rng.random() for _ in rates), reverse=True)
    points = [{"rate_rps": float(r), "attainment": a} for r, a in zip(rates, attainments)]
    assert point_goodput(points) == goodput(rates, attainments)
    assert point_goodput([]) == 0.0


def _points(pairs):
    return [{"rate_rps": r, "attainment": a} for r, a in pairs]


def test_refinement_rate_halves_below_a_failing_grid_then_bisects():
    lowest = random.uniform(2.0, 8.0)
    lower = refinement_rate(_points([(2 * lowest, 0.3), (lowest, 0.87)]), floor_rps=lowest / 4)
    assert math.isclose(lower, lowest / 2, rel_tol=0.01)
    middle = refinement_rate(_points([(lower, 0.95), (lowest, 0.87), (2 * lowest, 0.3)]), floor_rps=lowest / 4)
    assert lower < middle < lowest and math.isclose(middle, math.sqrt(lower * lowest), rel_tol=0.01)
    # a later pass above a failure is noise: the bracket is the first failure above the last pass before it
    assert refinement_rate(_points([(1.0, 0.95), (2.0, 0.8), (3.0, 0.92)]), 0.25) == pytest.approx(1.41, abs=0.01)


@pytest.mark.parametrize("pairs, floor", [
    ([(1.0, 1.0), (2.0, 0.95)], 0.1),  # every rate passes
    ([(1.0, 0.5)], 0.6),  # half the lowest would fall below the floor
    ([(1.0, 0.95), (1.1, 0.5)], 0.1),  # the bracket is already narrow
    ([], 0.1),
])
def test_refinement_rate_stops(pairs, floor):
    assert refinement_rate(_points(pairs), floor) is None


def test_sweep_refines_a_goodput_the_grid_would_call_zero(monkeypatch):
    crossing = random.uniform(1.6, 2.9)  # between the floor (0.75) and the lowest grid rate (3)

    def fake_run(engine, requests, deadline_s, seed):
        return {"outputs": [], "start_s": 0.0, "num_unfinished": 0}

    measured = []

    def fake_point(rate, outs, slo, start_s):
        measured.append(rate)
        return {"rate_rps": rate, "attainment": 1.0 if rate <= crossing else 0.6, "num_finished": 1,
                "num_requests": 1}

    monkeypatch.setattr(disagg_sweep, "run_requests", fake_run)
    monkeypatch.setattr(disagg_sweep, "summarize_point", fake_point)
    chat = workloads(smoke=True)[0]
    sweep = Sweep("c", chat, SLO(1.0, 1.0), [3.0, 6.0], 0.5, 2, 4, 1.0, 0.01)
    assert sweep.run(None, allowance_s=60.0, log=lambda _: None)["goodput_rps"] == 0.0

    measured.clear()
    result = Sweep("c", chat, SLO(1.0, 1.0), [3.0, 6.0], 0.5, 2, 4, 1.0, 0.01, refine_points=4).run(
        None, allowance_s=60.0, log=lambda _: None)
    rates = [p["rate_rps"] for p in result["points"]]
    assert measured[:2] == [3.0, 6.0] and rates == sorted(rates) and len(rates) == 6
    assert [p.get("refinement", False) for p in result["points"]].count(True) == 4
    passing = max(r for r in rates if r <= crossing)
    failing = min(r for r in rates if r > crossing)
    assert failing / passing < 1.25, rates  # four refinements narrow a 4x bracket to under 1.25x
    assert passing <= result["goodput_rps"] <= failing


def test_replicas_route_least_loaded_and_match_one_engine():
    seed = random.SystemRandom().randrange(1 << 30)
    prompts = token_prompts(seed, 6)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    ref = [o.token_ids for o in LLM("tiny", device="cpu", batch_invariant=True).generate(prompts, params)]
    config = EngineConfig(batch_invariant=True, cache=CacheConfig(num_blocks=128))
    with ReplicaCluster("tiny", config, ["cpu", "cpu"], threads=1) as cluster:
        ids = [cluster.add_request(p, params) for p in prompts]  # all at once: least loaded alternates
        done = {}
        while len(done) < len(ids):
            done.update({o.request_id: o for o in cluster.step() if o.finished})
        assert [cluster.assignment[i] for i in ids] == [0, 1] * 3, f"seed {seed}"
        assert [done[i].token_ids for i in ids] == ref, f"seed {seed}: replicas differ from one engine"
        assert all(done[i].metrics.ttft_s > 0 for i in ids)
        cluster.add_request(prompts[0], params, arrival_time=cluster.clock.now() + 60, request_id="x")
        with pytest.raises(ValueError, match="already in use"):
            cluster.add_request(prompts[0], params, request_id="x")
        cluster.abort("x")
        assert not cluster.has_unfinished()
        assert cluster.wait_idle(10)
        procs = list(cluster.processes)
    assert all(not p.is_alive() for p in procs), "replica processes outlived shutdown"


@pytest.mark.parametrize("devices, count, message", [
    (["cpu"], 2, "got 1 prefill device"),
    (["gpu:0"], 1, "must be 'cpu' or 'cuda:N'"),
    (["cuda"], 1, "must be 'cpu' or 'cuda:N'"),
    (["cuda:99"], 1, "does not exist"),
])
def test_placement_rejects_bad_devices(devices, count, message):
    with pytest.raises(ValueError, match=message):
        check_placement(devices, count, "prefill")


def test_dist_placement_needs_one_backend_and_a_gpu_per_rank():
    check_dist_placement(["cpu", "cpu"])
    check_dist_placement([None, None])
    with pytest.raises(ValueError, match="mix CPU and GPU"):
        check_dist_placement(["cpu", "cuda:0"])
    with pytest.raises(ValueError, match="GPU of its own"):
        check_dist_placement(["cuda:1", "cuda:1"])
    with pytest.raises(ValueError, match="every worker"):
        check_dist_placement(["cpu", None])
    with pytest.raises(ValueError, match="inproc"):
        LLM("tiny", device="cpu", mode="disagg", transport="inproc", prefill_devices=["cpu"], decode_devices=["cpu"])


def test_placement_puts_the_pinned_gpu_first(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    assert placement("cuda:1") == (["--device", "cuda:0"], {"CUDA_VISIBLE_DEVICES": "5,4,6"})
    assert placement("cuda:0") == (["--device", "cuda:0"], {"CUDA_VISIBLE_DEVICES": "4,5,6"})
    assert placement("cpu") == (["--device", "cpu"], {})
    assert placement(None) == ([], {})
    assert check_placement(["cuda:2", "cpu"], 2, "decode") == ["cuda:2", "cpu"]
    with pytest.raises(ValueError, match="does not exist"):
        check_placement(["cuda:3"], 1, "decode")


def test_bad_flags_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="exactly two devices"):
        main(["--devices", "cuda:0", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="time-budget-s"):
        main(["--smoke", "--time-budget-s", "0", "--out", str(tmp_path)])


def test_goodput_goal_takes_the_best_comparable_ratio():
    """A workload whose baseline met the SLOs at no rate tried gives no ratio (not inf or nan); the best other wins."""
    from minidisagg.bench.disagg_report import evaluate_goals

    rng = random.Random()
    base, best = rng.uniform(0.5, 3.0), rng.uniform(0.5, 6.0)

    def sweep(config, workload, rps):
        return {"config": config, "workload": workload, "goodput_per_gpu_rps": rps, "points": []}

    sweeps = [sweep("colocated-prefill_first", "chat", 0.0), sweep("disagg-no-overlap", "chat", 9.0),
              sweep("colocated-prefill_first", "summarization", base), sweep("disagg-overlap", "summarization", 0.1),
              sweep("disagg-no-overlap", "summarization", best)]
    goals = evaluate_goals({"models": {"m": {"sweeps": sweeps}}})
    ((name, met),) = [(g, ok) for g, ok in goals.items() if "goodput" in g]
    assert f"best: {best / base:.2f}x, m summarization" in name
    assert "no ratio on m chat" in name  # said, not silently dropped
    assert met == (best / base >= 1.5)


def _partial_result(rng: random.Random) -> dict:
    """A result as a run that lost requests and its disaggregated deployment would leave it."""
    failures = {"no result before the deadline": rng.randint(1, 3), f"decode worker d{rng.randrange(4)} died": 1}
    n_failed = sum(failures.values())
    n = n_failed + rng.randint(1, 6)
    point = {"rate_rps": 4.0, "attainment": (n - n_failed) / n / 2, "num_requests": n, "num_finished": n - n_failed,
             "num_failed": n_failed, "failures": failures, "requests_ttft_tpot_s": [None] * n,
             "ttft_p50_s": 0.1, "ttft_p99_s": 0.2, "itl_p50_s": None, "itl_p99_s": None,
             "breakdown_median_s": {"queue_s": None, "prefill_s": None, "transfer_s": None, "decode_queue_s": None},
             "kv_bytes_per_request_median": None, "transfer_over_ttft_median": None}
    sweep = {"config": "colocated-prefill_first", "workload": "chat", "points": [point], "goodput_rps": 0.0,
             "goodput_per_gpu_rps": 0.0, "skipped_rates_rps": [], "timelines": [], "slo": {"ttft_s": 1.0, "tpot_s": 0.1}}
    res = {"calibration": {"chat": {"ttft_s": 0.1, "tpot_s": 0.01, "rates_rps": [4.0], "fixed_rate_rps": 4.0,
                                    "slo": {"ttft_s": 1.0, "tpot_s": 0.1}}},
           "sweeps": [sweep], "errors": ["disagg (overlap=True) did not start: boom"]}
    return {"benchmark": "disagg", "date": "2026-12-07T12:00:00", "card": "cpu", "machine": {"cpu": "x"},
            "settings": {"devices": ["cpu", "cpu"], "time_budget_s": 45.0, "ttft_slo_scale": 5.0, "tpot_slo_scale": 3.0},
            "models": {"tiny": res}, "errors": []}, failures


def _drop_random_key(obj, rng: random.Random) -> str:
    """Delete one key somewhere inside nested dicts and lists; returns its path."""
    path = []
    while True:
        if isinstance(obj, list) and obj:
            i = rng.randrange(len(obj))
            path.append(str(i))
            obj = obj[i]
            continue
        if not isinstance(obj, dict) or not obj:
            return "/".join(path)
        key = rng.choice(list(obj))
        if rng.random() < 0.4 or not isinstance(obj[key], (dict, list)) or not obj[key]:
            del obj[key]
            return "/".join([*path, key])
        path.append(key)
        obj = obj[key]


def test_report_counts_failed_requests_and_survives_missing_keys(tmp_path):
    import copy

    from minidisagg.bench.disagg_report import evaluate_goals, to_markdown, write_results

    rng = random.Random()
    result, failures = _partial_result(rng)
    goals = evaluate_goals(result)
    assert any("greedy tokens == colocated (not checked: disagg (overlap=True) did not start: boom)" in g and not ok
               for g, ok in goals.items()), goals
    result["goals"] = goals
    text = to_markdown(result)
    n = result["models"]["tiny"]["sweeps"][0]["points"][0]["num_requests"]
    assert f"{sum(failures.values())} of {n} requests failed" in text
    assert all(reason in text for reason in failures) and "Greedy check: not run" in text
    for _ in range(40):
        broken = copy.deepcopy(result)
        where = _drop_random_key(broken, rng)
        broken["goals"] = evaluate_goals(broken)
        assert "## Goals" in to_markdown(broken), where
    paths = write_results(broken, tmp_path, plots=True)
    assert all(p.exists() for p in paths)
    for key in ("card", "date"):  # the file name's parts
        unnamed = copy.deepcopy(result)
        del unnamed[key]
        assert all(p.exists() for p in write_results(unnamed, tmp_path / key, plots=False)), key


def test_split_and_join_of_the_per_request_data():
    import copy

    rng = random.Random()
    result, _ = _partial_result(rng)
    sweep = result["models"]["tiny"]["sweeps"][0]
    sweep["timelines"] = [{"arrival_s": 0.0, "token_times_s": [rng.random() for _ in range(5)]}]
    point = sweep["points"][0]
    point["requests_ttft_tpot_s"] = [[rng.random(), rng.random()] for _ in range(point["num_requests"])]
    before = copy.deepcopy(result)
    summary, raw = split_requests(result)
    assert result == before  # the result itself is left whole
    assert "timelines" not in summary["models"]["tiny"]["sweeps"][0]
    assert "requests_ttft_tpot_s" not in summary["models"]["tiny"]["sweeps"][0]["points"][0]
    assert summary["models"]["tiny"]["sweeps"][0]["points"][0]["failures"] == point["failures"]
    assert join_requests(summary, raw) == result
    assert join_requests(summary, {"models": {}}) == summary  # without the raw file: the summary as it is


def test_summarize_point_counts_failures_with_reasons():
    from minidisagg.bench.disagg_sweep import summarize_point
    from minidisagg.engine.llm_engine import RequestOutput
    from minidisagg.metrics import RequestMetrics, RequestTimeline

    rng = random.Random()

    def finished(i):
        tl = RequestTimeline(arrival_s=0.0, prefill_start_s=0.01, prefill_end_s=0.02)
        for k in range(3):
            tl.record_token(0.05 + 0.01 * k + rng.random() * 1e-3)
        tl.finish_s = tl.token_times_s[-1]
        return RequestOutput(str(i), None, [1], "", [1, 2, 3], True, "length", RequestMetrics.from_timeline(tl), tl)

    def failed(i, error):
        return RequestOutput(str(i), None, [1], "", [], True, "error", None, RequestTimeline(0.0, finish_s=1.0),
                             error=error)

    outs = [finished(i) for i in range(rng.randint(1, 5))]
    outs += [None, failed(90, "decode worker d1 died"), failed(91, "decode worker d1 died")]
    rng.shuffle(outs)
    point = summarize_point(2.0, outs, SLO(10.0, 10.0), 0.0)
    assert point["num_failed"] == 3 and point["num_finished"] == len(outs) - 3
    assert point["failures"] == {"no result before the deadline": 1, "decode worker d1 died": 2}
    assert point["attainment"] == pytest.approx((len(outs) - 3) / len(outs))
