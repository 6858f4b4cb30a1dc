"""Where does a GPU decode step go? Graph replay alone vs the engine's whole step, and the kernels inside.

A diagnostic, not a benchmark of record: for each model at batch 1 it times the captured CUDA
graph by itself (CUDA events), the engine's whole decode step, and lists the graph's kernels by
total GPU time from torch.profiler.

    python benchmarks/profile_gpu_decode.py [--models smollm2-135m,llama-1b,llama-8b] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from minidisagg.bench.gpu_rows import decode_step_ms, engine_llm, random_prompts
from minidisagg.models.llama import weight_bytes
from minidisagg.roofline import measure_copy_bandwidth


def graph_replay_ms(llm, batch: int, iters: int = 50) -> float:
    """GPU time of one replay of the batch's captured graph (inputs left as the last step wrote them)."""
    graphs = llm.engine.runner.decode_graphs
    step = graphs._steps[graphs.bucket_for(batch)]
    for _ in range(5):
        step.graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        step.graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def kernel_table(llm, batch: int) -> list[dict]:
    """The graph's kernels, by total CUDA time over 10 replays."""
    graphs = llm.engine.runner.decode_graphs
    step = graphs._steps[graphs.bucket_for(batch)]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step.graph.replay()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        if ev.device_time_total > 0:
            rows.append({"kernel": ev.key[:90], "calls_per_step": ev.count / 10,
                         "us_per_step": ev.device_time_total / 10})
    return sorted(rows, key=lambda r: -r["us_per_step"])[:15]


def host_profile(llm, batch: int = 1, new_tokens: int = 64) -> str:
    """cProfile of ``generate`` at ``batch``: where the host spends a step (GPU waits show as ``tolist``)."""
    import cProfile
    import io
    import pstats

    from minidisagg.engine.sampling import SamplingParams

    prompts = random_prompts(batch, 128, llm.loaded.config.vocab_size, seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    prof = cProfile.Profile()
    prof.enable()
    llm.generate(prompts, params, use_tqdm=False)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(18)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="smollm2-135m,llama-1b,llama-8b")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    copy_bw = measure_copy_bandwidth("cuda")
    report = {"card": torch.cuda.get_device_name(0), "copy_GBps": copy_bw / 1e9, "models": {}}
    for model in args.models.split(","):
        llm = engine_llm(model, max_num_seqs=1, max_model_len=192, cuda_graphs=True)
        step_ms, _ = decode_step_ms(llm, 1, 128, 48)
        replay = graph_replay_ms(llm, 1)
        floor = 1000 * weight_bytes(llm.loaded.model) / copy_bw
        kernels = kernel_table(llm, 1)
        print(host_profile(llm))
        report["models"][model] = {"engine_step_ms": step_ms, "graph_replay_ms": replay, "weight_floor_ms": floor,
                                   "kernels": kernels}
        print(f"{model}: engine step {step_ms:.3f} ms, graph replay {replay:.3f} ms, weight floor {floor:.3f} ms")
        for k in kernels:
            print(f"   {k['us_per_step']:8.1f} us  x{k['calls_per_step']:.0f}  {k['kernel']}")
        llm.shutdown()
        del llm
        torch.cuda.empty_cache()
    (args.out / "gpu-decode-profile.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
