"""``import minidisagg`` shortens how long torch's OpenMP threads spin, unless the user chose a policy."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SNIPPET = "import minidisagg, torch; torch.ones(4096).sum()"
KNOBS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MINIDISAGG_KEEP_OMP_POLICY")


# (what the user set, the policy libgomp displays, the spin count it took). libgomp displays an unset policy as
# PASSIVE; the spin count tells them apart: 300,000 by default, 0 for PASSIVE, ~forever for ACTIVE.
CASES = [({}, "PASSIVE", "10000"),
         ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE", "30000000000"),
         ({"OMP_WAIT_POLICY": "PASSIVE"}, "PASSIVE", "0"),
         ({"GOMP_SPINCOUNT": "5000"}, "PASSIVE", "5000"),
         ({"MINIDISAGG_KEEP_OMP_POLICY": "1"}, "PASSIVE", "300000")]


@pytest.mark.parametrize("given, policy, spins", CASES, ids=["unset", "active", "passive", "spincount", "keep"])
def test_libgomp_reads_the_spin_count_minidisagg_sets_before_torch_loads(given, policy, spins):
    env = {k: v for k, v in os.environ.items() if k not in KNOBS}
    env.update(given, OMP_DISPLAY_ENV="VERBOSE")  # libgomp prints the settings it read when it initialises
    out = subprocess.run([sys.executable, "-c", SNIPPET], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    if "GOMP_SPINCOUNT = " not in out.stderr:
        pytest.skip("this torch build's OpenMP runtime does not display its settings (not libgomp)")
    assert f"OMP_WAIT_POLICY = '{policy}'" in out.stderr, out.stderr[-2000:]
    assert f"GOMP_SPINCOUNT = '{spins}'" in out.stderr, out.stderr[-2000:]
