"""A discrete-event simulator of serving fleets that runs the engine's own scheduler on a cost model.

``simulate(FleetSpec(...), costs, Trace.of(workload))``: colocated replicas or xPyD pools, each
instance a real ``Scheduler`` with its ``BlockManager``, every step priced by a calibrated
``StepCostModel``, KV moved over shared links; ``plan_splits`` / ``plan_fleet`` search xPyD splits for goodput per GPU (``cost_table``: costs from a committed GPU benchmark; ``serving``: the serving path's costs fitted on the
committed two-GPU sweeps). See ``sim/instance.py`` for the fast path.
"""

from minidisagg.sim.fleet import Fleet, FleetSpec, simulate
from minidisagg.sim.instance import InstanceConfig, SimInstance
from minidisagg.sim.plan import FleetPlan, SplitResult, plan_fleet, plan_splits, search_splits, sweep_split
from minidisagg.sim.link import LinkSpec, SharedLink, links_from_transport_json
from minidisagg.sim.results import CompactTimeline, SimResult, Trace
from minidisagg.sim.serving import ServingCosts, apply_serving_costs, load_serving_costs

__all__ = ["Fleet", "FleetSpec", "simulate", "InstanceConfig", "SimInstance", "LinkSpec", "SharedLink",
           "links_from_transport_json", "CompactTimeline", "SimResult", "Trace", "SplitResult", "plan_splits",
           "sweep_split", "search_splits", "plan_fleet", "FleetPlan", "ServingCosts", "load_serving_costs",
           "apply_serving_costs"]
