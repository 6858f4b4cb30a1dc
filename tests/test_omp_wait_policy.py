"""``import minidisagg`` makes torch's OpenMP threads wait passively, unless the user chose a policy."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SNIPPET = ("import minidisagg, torch; torch.ones(4096).sum(); "
           "print('policy', __import__('os').environ.get('OMP_WAIT_POLICY', 'unset'))")


# libgomp's spin count per policy: unset spins 300,000 times before sleeping, PASSIVE never, ACTIVE ~forever
SPINS = {"PASSIVE": "0", "ACTIVE": "30000000000", "unset": "300000"}


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE"), ("PASSIVE", "PASSIVE"),
                                             ("keep", "unset")])
def test_libgomp_reads_the_policy_minidisagg_sets_before_torch_loads(given, expected):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "MINIDISAGG_KEEP_OMP_POLICY",
                                                            "GOMP_SPINCOUNT")}
    env["OMP_DISPLAY_ENV"] = "VERBOSE"  # libgomp prints the settings it read when it initialises
    if given == "keep":  # the benchmark comparing policies asks minidisagg to leave the variable alone
        env["MINIDISAGG_KEEP_OMP_POLICY"] = "1"
    elif given is not None:
        env["OMP_WAIT_POLICY"] = given
    out = subprocess.run([sys.executable, "-c", SNIPPET], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"policy {expected}" in out.stdout
    if "GOMP_SPINCOUNT = " not in out.stderr:
        pytest.skip("this torch build's OpenMP runtime does not display its settings (not libgomp)")
    # (libgomp displays an unset policy as PASSIVE too; the spin count tells them apart)
    assert f"OMP_WAIT_POLICY = '{'PASSIVE' if expected == 'unset' else expected}'" in out.stderr, out.stderr[-2000:]
    assert f"GOMP_SPINCOUNT = '{SPINS[expected]}'" in out.stderr, out.stderr[-2000:]
