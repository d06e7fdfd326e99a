"""What each kind of event does to the simulated cluster.

A mixin of Simulator, kept in its own file so that the job's physics and the execution of
decisions read in sim.py and the events (contention, stragglers, failures, joining nodes) here.
It uses the Simulator's state (nodes, workers, the event heap) and its placement helpers.
"""

from __future__ import annotations

import heapq

from raysys.agent.sim_events import TimedEvent
from raysys.agent.sim_state import SimNode, SimWorker
from raysys.control.snapshot import WorkerView, matches


class EventEffects:
    def _schedule(self, time: float, kind: str, **fields) -> None:
        heapq.heappush(self._events, TimedEvent(time, self._next_seq, kind, **fields))
        self._next_seq += 1

    def _fire(self, event: TimedEvent) -> None:
        kind = event.kind
        if kind == "contention":
            for node in self._contention_targets(event):
                node.tenant_cpus += event.cpus
                if event.duration_s is not None:
                    self._schedule(
                        self.time_s + event.duration_s,
                        "contention_end",
                        node=node.id,
                        cpus=event.cpus,
                    )
        elif kind == "contention_end":
            self.nodes[event.node].tenant_cpus -= event.cpus
            self._restore_minimums()
        elif kind == "straggler":
            self._start_straggler(event)
        elif kind == "straggler_end":
            target = self.workers.get(event.worker) if event.worker else self.nodes.get(event.node)
            if target is not None:
                target.factors.pop(event.token, None)
        elif kind == "worker_failure":
            if event.worker is not None:
                victim = self.workers.get(event.worker)
            else:
                victim = _pick(sorted(self.workers.values(), key=lambda w: w.id), event.pick)
            if victim is not None:
                self._fail([victim])
        elif kind == "node_failure":
            node = self.nodes[event.node]
            node.alive = False
            self._fail([w for w in self.workers.values() if w.node == node.id])
            if event.duration_s is not None:
                self._schedule(self.time_s + event.duration_s, "node_recover", node=node.id)
        elif kind == "node_recover":
            self.nodes[event.node].alive = True
            self._restore_minimums()
        elif kind == "node_join":
            self._add_node(event.join, event.join.speed)
            self._restore_minimums()
        self._dirty = True

    def _contention_targets(self, event: TimedEvent) -> list[SimNode]:
        if event.node not in (None, "*"):
            return [self.nodes[event.node]]
        candidates = [
            n
            for n in sorted(self.nodes.values(), key=lambda n: n.id)
            if n.alive and matches(n.labels, event.selector or {})
        ]
        if event.node == "*":
            chosen = _pick(candidates, event.pick)
            return [chosen] if chosen else []
        return candidates

    def _start_straggler(self, event: TimedEvent) -> None:
        if event.worker is not None:
            if event.worker == "*":
                target = _pick(sorted(self.workers.values(), key=lambda w: w.id), event.pick)
            else:
                target = self.workers.get(event.worker)
            where = {"worker": target.id} if target else {}
        else:
            if event.node == "*":
                hosts = sorted({w.node for w in self.workers.values()})
                target = self.nodes.get(_pick(hosts, event.pick) or "")
            else:
                target = self.nodes.get(event.node)
            where = {"node": target.id} if target else {}
        if target is None:
            return
        target.factors[event.seq] = event.factor
        if event.duration_s is not None:
            self._schedule(
                self.time_s + event.duration_s, "straggler_end", token=event.seq, **where
            )

    def _fail(self, victims: list[SimWorker]) -> None:
        if not victims:
            return
        for worker in victims:
            self._dead_unreported.append(
                WorkerView(worker.id, worker.partner, worker.node, 0.0, worker.local_batch, False)
            )
            self._failure_times.append(self.time_s)
            self._remove_worker(worker)
        self._stall_left += self.costs.failure
        self._restore_minimums()


def _pick(items: list, u: float):
    """The item a uniform draw u in [0, 1) selects, or None from an empty list."""
    return items[min(int(u * len(items)), len(items) - 1)] if items else None
