"""The ``minidisagg bench`` suites; each suite's module has a ``main(argv)`` that the CLI calls.

- ``cpu``: CPU decode throughput against HF transformers and a bare-matmul ceiling.
- ``transport``: KV transfer bandwidth per transport and message size, against plain ceilings.
- ``gpu``: one CUDA card's ceilings, every Triton kernel, decode and prefill against their floors.
- ``disagg``: 1P1D against two colocated replicas on two GPUs (goodput, SLO attainment, KV link).
- ``fuzz``: hostile inputs against live workers and their router; a decode worker stopped by SIGSTOP.

Results go to ``benchmarks/results/`` (``common.default_out_dir``). Importing this package loads
nothing heavy: torch comes in with a suite's module.
"""
