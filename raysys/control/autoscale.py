"""Working with the Ray autoscaler (`agent.autoscale: true`), so the agent can grow a partner
beyond the nodes that exist now.

Two halves, kept apart as everywhere in raysys (decisions apart from execution):

* What the agent sees. Without an autoscaler, a partner can grow only into free CPUs on nodes
  that carry its labels, and the Snapshot says so. With one, the cluster can add such nodes, so
  the Snapshot also lists, per partner, a *virtual node* with the CPUs its remaining
  `workers.max` would need (`virtual_nodes`). Policies, Guardrails and featurize see the same
  Snapshot type as always (invariant 4): more free capacity, nothing else.
* What the cluster is asked for. `ray.autoscaler.sdk.request_resources` is a standing, absolute,
  cluster-wide request (each call replaces the last one; the autoscaler keeps at least that much
  capacity, and never removes nodes it needs for it). So after every change to the group,
  `CapacityRequest.sync` sends one bundle per live worker of the job (starting, spare or active),
  each with its partner's placement as the bundle's label selector, and an empty request when the
  job ends, which lets the autoscaler scale idle nodes down again. A worker that does not fit yet
  stays pending until the new node is up, then joins like any cold newcomer.

Limits: one request per cluster, so two jobs with autoscale on overwrite each other's request
(Ray's API has no per-job request); label selectors on bundles need autoscaler v2 (the default
for `ray up` and KubeRay since Ray 2.50).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from raysys.control.snapshot import NodeView
from raysys.spec import JobSpec

log = logging.getLogger(__name__)

VIRTUAL_NODE_PREFIX = "autoscaler:"


def virtual_nodes(spec: JobSpec, live_workers: dict[str, int]) -> list[NodeView]:
    """One node per partner whose capacity is what its workers.max still allows: added to the
    Snapshot's real nodes when the cluster can grow."""
    nodes = []
    for p in spec.partners:
        room = max(0, p.workers.max - live_workers.get(p.name, 0)) * p.cpus_per_worker
        if room > 0:
            nodes.append(NodeView(f"{VIRTUAL_NODE_PREFIX}{p.name}", dict(p.placement), room,
                                  room))
    return nodes


def _ray_request_resources(bundles: list[dict], bundle_label_selectors: list[dict]) -> None:
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles, bundle_label_selectors=bundle_label_selectors)


class CapacityRequest:
    """Keeps the autoscaler's standing request equal to the job's live workers."""

    def __init__(self, spec: JobSpec,
                 request: Callable[[list[dict], list[dict]], None] = _ray_request_resources
                 ) -> None:
        self.spec = spec
        self._request = request  # Ray's request_resources; tests pass a recorder
        self._last: tuple | None = None

    def sync(self, live_by_partner: dict[str, int]) -> None:
        bundles, selectors = [], []
        for p in self.spec.partners:
            for _ in range(live_by_partner.get(p.name, 0)):
                bundles.append({"CPU": p.cpus_per_worker})
                selectors.append(dict(p.placement))
        key = (tuple(map(tuple, (sorted(b.items()) for b in bundles))),
               tuple(map(tuple, (sorted(s.items()) for s in selectors))))
        if key == self._last:
            return
        self._last = key
        try:
            self._request(bundles, selectors)
        except Exception as exc:  # the autoscaler is a helper: never fail the job over it
            log.warning("request_resources failed (%s); scale-ups wait for free capacity", exc)

    def release(self) -> None:
        self.sync({})
