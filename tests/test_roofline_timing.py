"""The roofline module's timers and measured ceilings: device time on CUDA, wall time elsewhere."""

from __future__ import annotations

import time

import pytest
import torch

from minidisagg import roofline


def test_time_device_s_on_cpu_is_the_wall_time_of_one_call():
    delay_s = 0.004
    t = roofline.time_device_s(lambda: time.sleep(delay_s), torch.device("cpu"), samples=5)
    assert delay_s <= t < delay_s + 0.05


def test_cpu_read_and_copy_bandwidth_are_positive_and_plausible():
    read = roofline.measure_read_bandwidth("cpu", 8 << 20, iters=3)
    copy = roofline.measure_copy_bandwidth("cpu", 8 << 20, iters=3)
    for bw in (read, copy):
        assert 1e8 < bw < 1e13  # between 0.1 GB/s and 10 TB/s


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_time_device_s_counts_gpu_time_not_host_launches():
    dev = torch.device("cuda")
    x = torch.randn(1 << 22, device=dev)  # 16 MB: an elementwise kernel of a few microseconds
    y = torch.empty_like(x)
    def add_one() -> None:
        torch.add(x, 1.0, out=y)
    wall_s = roofline.time_fn_s(add_one, dev, warmup=3, iters=20)
    for graph in (True, False):
        y.zero_()
        device_s = roofline.time_device_s(add_one, dev, graph=graph)
        assert torch.equal(y, x + 1.0)  # the timed calls did the work
        assert 0 < device_s < wall_s  # the wall time adds the launch and the synchronisation
        # 32 MB read + written at a plausible rate
        assert 1e11 < 2 * x.numel() * 4 / device_s < 2e13
