"""The placement leaderboard: a scheduling policy and a prefill/decode split, ranked by replayed goodput per GPU.

A submission is a Python file that defines ``NAME`` (a short string), ``PLACEMENT = (num_prefill,
num_decode)`` (0 prefill GPUs means colocated on ``num_decode`` GPUs) and ``policy``, a function of
the engine scheduler's ``Policy`` shape ``(waiting, running, budget) -> StepPlan`` that schedules the
colocated engines, or the prefill engines of an xPyD split (decode engines always decode first).

Every rule that decides the rank is fixed in ``RULES``: the GPU budget, the seeded workload, the SLO,
the rate grid and a committed cost calibration (phase costs fitted once, stored below), so the host
that runs the leaderboard cannot change the numbers. Each entry is replayed by ``placement_lab``'s
costed stages on simulated clocks at every rate of the grid, and its goodput per GPU is the highest
per-GPU rate whose SLO attainment stays at or above the target (interpolated between grid points).

    minidisagg course leaderboard my_entry.py [--json out.json]
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from minidisagg.course.placement_lab import PhaseCosts, Placement, sweep_goodput_rps
from minidisagg.course.transfer_lab import PrefillCostModel
from minidisagg.engine.scheduler import PolicyError, StepBudget, StepPlan
from minidisagg.engine.sequence import Sequence as EngineSequence
from minidisagg.metrics import SLO, RequestMetrics
from minidisagg.models.registry import LoadedModel, load_model
from minidisagg.workload import Fixed, LogNormal, poisson_workload

ENTRIES_DIR = Path(__file__).with_name("leaderboard_entries")


@dataclass(frozen=True)
class Calibration:
    """Committed phase costs (smollm2-135m on a 2-core CPU, fp32, one thread, fastest of 3 repeats)."""

    prefill_fixed_s: float = 0.0286
    prefill_per_token_s: float = 2.3263e-3
    prefill_per_token_sq_s: float = 1.2145e-6
    decode_fixed_s: float = 0.0347
    decode_per_seq_s: float = 2.08e-3
    kv_bytes_per_token: int = 46_080
    link_GBps: float = 3.0
    max_batch: int = 32

    def phase_costs(self) -> PhaseCosts:
        """These numbers as the ``PhaseCosts`` that ``placement_lab``'s costed stages charge."""
        prefill = PrefillCostModel(self.prefill_fixed_s, self.prefill_per_token_s, self.prefill_per_token_sq_s)
        return PhaseCosts(prefill, self.decode_fixed_s, self.decode_per_seq_s, self.kv_bytes_per_token,
                          self.link_GBps, self.max_batch)


@dataclass(frozen=True)
class Rules:
    """Everything that decides a rank: budget, workload, SLO, rate grid, seed and the committed calibration."""

    gpu_budget: int = 4
    num_requests: int = 160
    seed: int = 7
    prompt_mean_tokens: int = 128
    prompt_sigma_frac: float = 0.5
    prompt_min_tokens: int = 16
    prompt_max_tokens: int = 384
    output_tokens: int = 32
    ttft_slo_s: float = 1.75
    tpot_slo_s: float = 0.075
    target_attainment: float = 0.9
    per_gpu_rates_rps: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.2, 2.4)
    token_budget: int = 128  # tokens one step of a colocated or prefill engine may compute
    calibration: Calibration = field(default_factory=Calibration)

    @property
    def slo(self) -> SLO:
        """The SLO every request is judged by."""
        return SLO(self.ttft_slo_s, self.tpot_slo_s)

    def workload(self, total_rate_rps: float) -> list:
        """The seeded Poisson workload at ``total_rate_rps`` (the same seed at every rate and for every entry)."""
        prompts = LogNormal(self.prompt_mean_tokens, self.prompt_sigma_frac, self.prompt_min_tokens,
                            self.prompt_max_tokens)
        return poisson_workload(total_rate_rps, self.num_requests, prompts, Fixed(self.output_tokens), self.seed)

    def describe(self) -> str:
        """The rules, one per line."""
        return "\n".join(f"  {f.name:<20} {getattr(self, f.name)}" for f in dataclasses.fields(self))


RULES = Rules()


class SubmissionError(ValueError):
    """A submission that cannot be ranked: a missing or mistyped name, a split over budget, a broken policy."""


@dataclass(frozen=True)
class Submission:
    """A loaded entry: its name, its split and its policy."""

    name: str
    placement: tuple[int, int]
    policy: Callable[..., StepPlan]
    path: Optional[Path] = None


@dataclass(frozen=True)
class Entry:
    """One ranked line: an entry's goodput per GPU and its attainment at every per-GPU rate of the grid."""

    name: str
    placement: tuple[int, int]
    goodput_per_gpu_rps: float
    attainment_by_rate: dict[float, float]
    is_submission: bool = False

    @property
    def split(self) -> str:
        """'colocated x4' or '1P3D'."""
        return Placement(*self.placement).name


def check_placement(placement: Any, budget: int) -> tuple[int, int]:
    """``placement`` as a valid (num_prefill, num_decode) pair within ``budget`` GPUs, else SubmissionError."""
    if not isinstance(placement, (tuple, list)) or len(placement) != 2:
        raise SubmissionError(f"PLACEMENT must be a pair (num_prefill, num_decode), got {placement!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in placement):
        raise SubmissionError(f"PLACEMENT must hold two ints, got {placement!r}")
    x, y = placement
    if x < 0 or y < 1:
        raise SubmissionError(f"PLACEMENT {placement!r}: need num_prefill >= 0 and num_decode >= 1")
    if x + y > budget:
        raise SubmissionError(f"PLACEMENT {placement!r} uses {x + y} GPUs, over the budget of {budget}")
    return x, y


def make_submission(name: Any, placement: Any, policy: Any, rules: Rules = RULES,
                    path: Optional[Path] = None) -> Submission:
    """Validate the three parts of an entry (types, budget) and bundle them."""
    if not isinstance(name, str) or not name.strip():
        raise SubmissionError(f"NAME must be a non-empty string, got {name!r}")
    if not callable(policy):
        raise SubmissionError(f"policy must be a function (waiting, running, budget) -> StepPlan, got {policy!r}")
    return Submission(name.strip(), check_placement(placement, rules.gpu_budget), policy, path)


def load_submission(path: str | Path, rules: Rules = RULES) -> Submission:
    """Import a submission file and validate ``NAME``, ``PLACEMENT`` and ``policy``."""
    path = Path(path)
    if not path.is_file():
        raise SubmissionError(f"{path}: no such file")
    spec = importlib.util.spec_from_file_location(f"leaderboard_submission_{abs(hash(str(path.resolve())))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001
        raise SubmissionError(f"{path.name}: importing it raised {type(err).__name__}: {err}") from err
    missing = [n for n in ("NAME", "PLACEMENT", "policy") if not hasattr(module, n)]
    if missing:
        raise SubmissionError(f"{path.name}: missing {', '.join(missing)} (a submission defines NAME, PLACEMENT "
                              f"and policy)")
    try:
        return make_submission(module.NAME, module.PLACEMENT, module.policy, rules, path)
    except SubmissionError as err:
        raise SubmissionError(f"{path.name}: {err}") from None


def guarded(policy: Callable[..., Any]) -> Callable[[list, list, StepBudget], StepPlan]:
    """``policy`` with its failures turned into SubmissionError: it raised, returned no StepPlan, or stalled."""
    def run(waiting: list[EngineSequence], running: list[EngineSequence], budget: StepBudget) -> StepPlan:
        try:
            plan = policy(waiting, running, budget)
        except Exception as err:  # noqa: BLE001
            raise SubmissionError(f"policy raised {type(err).__name__}: {err}") from err
        if not isinstance(plan, StepPlan):
            raise SubmissionError(f"policy returned {type(plan).__name__}, not a StepPlan")
        if plan.is_empty and waiting and not running:
            raise SubmissionError(f"policy returned an empty plan while {len(waiting)} requests waited and none ran: "
                                  f"the replay could never finish")
        return plan

    run.__name__ = getattr(policy, "__name__", "submission")
    return run


def sim_model() -> LoadedModel:
    """The tiny random-weight model that only sizes the replay's KV pools (its weights never run)."""
    return load_model("tiny", device="cpu", dtype="float32", random_weights=True)


def replay_sweep(submission: Submission, rules: Rules = RULES,
                 loaded: Optional[LoadedModel] = None) -> dict[float, list[RequestMetrics]]:
    """Replay the entry at every rate of the grid: {total rate: metrics of every request}."""
    loaded = loaded or sim_model()
    placement = Placement(*submission.placement)
    costs = rules.calibration.phase_costs()
    policy = guarded(submission.policy)
    out: dict[float, list[RequestMetrics]] = {}
    for per_gpu in rules.per_gpu_rates_rps:
        total = per_gpu * placement.num_gpus
        try:
            out[total] = placement.replay(loaded, costs, rules.workload(total), seed=rules.seed, policy=policy,
                                          token_budget=rules.token_budget)
        except PolicyError as err:
            raise SubmissionError(f"policy returned an invalid plan: {err}") from err
    return out


def evaluate(submission: Submission, rules: Rules = RULES, loaded: Optional[LoadedModel] = None,
             is_submission: bool = False) -> Entry:
    """Replay one entry over the rate grid and read off its goodput per GPU."""
    by_rate = replay_sweep(submission, rules, loaded)
    gpus = Placement(*submission.placement).num_gpus
    goodput = sweep_goodput_rps(by_rate, rules.slo, rules.target_attainment) / gpus
    slo = rules.slo
    attainment = {rate / gpus: sum(slo.met_by(m) for m in ms) / len(ms) for rate, ms in by_rate.items()}
    return Entry(submission.name, submission.placement, goodput, attainment, is_submission)


def reference_submissions(rules: Rules = RULES) -> list[Submission]:
    """The committed reference entries (``leaderboard_entries/*.py``), in file-name order."""
    return [load_submission(p, rules) for p in sorted(ENTRIES_DIR.glob("*.py")) if p.name != "__init__.py"]


def rank(entries: Sequence[Entry]) -> list[Entry]:
    """Highest goodput per GPU first; ties by name, then a reference before a submission."""
    return sorted(entries, key=lambda e: (-round(e.goodput_per_gpu_rps, 9), e.name, e.is_submission))


def run_leaderboard(submission: Optional[Submission], rules: Rules = RULES) -> list[Entry]:
    """Every reference entry and the submission (if any), replayed under ``rules`` and ranked."""
    loaded = sim_model()
    entries = [evaluate(s, rules, loaded) for s in reference_submissions(rules)]
    if submission is not None:
        entries.append(evaluate(submission, rules, loaded, is_submission=True))
    return rank(entries)


def table(ranked: Sequence[Entry]) -> str:
    """The ranked entries as text, the submission marked with '*'."""
    lines = [f"{'rank':>4}  {'entry':<28} {'split':<13} {'goodput/GPU':>12}"]
    for i, e in enumerate(ranked, 1):
        mark = "*" if e.is_submission else " "
        lines.append(f"{i:>4}{mark} {e.name:<28} {e.split:<13} {e.goodput_per_gpu_rps:9.3f} req/s")
    return "\n".join(lines)


def to_json(ranked: Sequence[Entry], rules: Rules = RULES) -> dict[str, Any]:
    """The rules and every ranked entry, as plain JSON."""
    return {"rules": dataclasses.asdict(rules),
            "entries": [{"rank": i, "name": e.name, "placement": list(e.placement), "split": e.split,
                         "goodput_per_gpu_rps": e.goodput_per_gpu_rps, "submission": e.is_submission,
                         "attainment_by_rate_per_gpu": {f"{r:g}": a for r, a in e.attainment_by_rate.items()}}
                        for i, e in enumerate(ranked, 1)]}


def run_command(submission_path: Optional[str], json_path: Optional[str]) -> int:
    """Rank ``submission_path`` (or the reference entries alone) and print the board: 0 ranked, 2 a bad submission."""
    t0 = time.perf_counter()
    try:
        submission = load_submission(submission_path) if submission_path else None
        ranked = run_leaderboard(submission)
    except SubmissionError as err:
        print(f"bad submission: {err}", file=sys.stderr)
        return 2
    print(f"rules (fixed; the calibration is committed, so the host cannot change a rank):\n{RULES.describe()}")
    print(table(ranked))
    mine = next((i for i, e in enumerate(ranked, 1) if e.is_submission), None)
    if mine is not None:
        e = ranked[mine - 1]
        print(f"{e.name}: {e.goodput_per_gpu_rps:.3f} req/s per GPU, rank {mine} of {len(ranked)}")
    print(f"replayed {len(ranked)} entries x {len(RULES.per_gpu_rates_rps)} rates in {time.perf_counter() - t0:.1f} s")
    if json_path:
        Path(json_path).write_text(json.dumps(to_json(ranked), indent=2) + "\n")
    return 0


def reference_entry(rules: Rules) -> tuple[Callable[..., StepPlan], tuple[int, int]]:
    """A sound entry for ``rules``: the xPyD that the queueing model ranks best per GPU, whole prompts first."""
    from minidisagg.course.placement_lab import WorkloadShape, system_goodput
    from minidisagg.engine.scheduler import prefill_first

    costs = rules.calibration.phase_costs()
    shape = WorkloadShape(rules.prompt_mean_tokens, rules.output_tokens)
    options = [(x, y) for x in range(1, rules.gpu_budget) for y in range(1, rules.gpu_budget - x + 1)]
    best = max(options, key=lambda xy: system_goodput(costs, shape, rules.slo, *xy) / sum(xy))
    return prefill_first, best
