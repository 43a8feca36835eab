"""The routing decision for one message: which route carries it, and where it fails over to.

:class:`RoutePicker` turns a ``RoutingTable`` (see ``controller/routing.py``) into per-network
lookup structures once, so that :meth:`RoutePicker.pick` is a dict hit, a bisect and one small
object. Per network:

* the *weighted* routes: every route with a weight above 0 whose role is not ``excluded`` (and
  that is enabled, when the picker is given the enabled routes), with their cumulative weights.
  A pick draws ``u`` uniform in [0, 1) and takes the route whose cumulative interval holds
  ``u * total``: each route gets its table weight as its share of traffic (the exploration share
  included, the table's weights already carry it). Weights are renormalised over the enabled
  routes, so disabling one spreads its share over the others in proportion.
* the *failover order*: the ranked routes (primary, then backups best first) in table order,
  then the exploration routes, never an excluded one; weight 0 routes included (a backup without
  traffic is still a place to go). A decision carries this order without its own route.

A pinned route (``pinned=``, used by the scheduler to test that very route) is taken as it is,
even when the table excludes it or does not list the network, and gets no failover: failing over
would measure another route under the pinned one's name.

The picker is immutable. A new table means a new picker, swapped in by replacing the reference
(one assignment, atomic for other tasks and threads). Messages in flight keep their
:class:`Decision`, which holds its own failover tuple and table version, so a swap never changes
the failover of a message already under way; :meth:`RoutePicker.next_after` only skips routes
that the new picker's enabled set no longer holds.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from probe_agent.protocol import RouteChoice, RoutingTable

__all__ = ["Decision", "NoRoute", "RoutePicker"]

_RANKED = ("primary", "backup")


class NoRoute(LookupError):
    """No route can carry a message to this network (or the pinned route is not enabled)."""


@dataclass(frozen=True, slots=True)
class Decision:
    """The route chosen for one message, its failover routes in order, and why."""

    route: str
    failover: tuple[str, ...]
    reason: str
    table_version: int
    role: str


def _describe(choice: RouteChoice) -> str:
    """A route's place in words: "primary, score 0.91 — <the table's reason>"."""
    score = "unscored" if choice.score is None else f"score {choice.score:.2f}"
    text = f"{choice.role}, {score}"
    return f"{text} — {choice.reason}" if choice.reason else text


class _Network:
    """One network's precomputed picking data (see the module docstring)."""

    __slots__ = ("cumulative", "failovers", "fallback", "reasons", "roles", "routes", "total")

    def __init__(self, choices: Sequence[RouteChoice], enabled: frozenset[str] | None, version: int) -> None:
        usable = [c for c in choices if c.role != "excluded" and (enabled is None or c.route in enabled)]
        ranked = [c for c in usable if c.role in _RANKED]
        order = tuple(
            dict.fromkeys(c.route for c in [*ranked, *(c for c in usable if c.role not in _RANKED)])
        )
        weighted: dict[str, RouteChoice] = {}
        for c in usable:
            if c.weight > 0 and math.isfinite(c.weight):
                weighted.setdefault(c.route, c)
        cumulative: list[float] = []
        total = 0.0
        for c in weighted.values():
            total += c.weight
            cumulative.append(total)
        self.cumulative = cumulative
        self.total = total
        self.routes = tuple(weighted)
        self.roles = tuple(c.role for c in weighted.values())
        count = f"of {len(weighted)} route{'s' if len(weighted) != 1 else ''}"
        self.reasons = tuple(f"{count}: {_describe(c)}" for c in weighted.values())
        self.failovers = tuple(tuple(r for r in order if r != route) for route in weighted)
        # No enabled route has a weight (all 0): the first of the failover order, always.
        self.fallback: Decision | None = None
        if not weighted and order:
            first = next(c for c in usable if c.route == order[0])
            self.fallback = Decision(
                route=first.route,
                failover=order[1:],
                reason=f"first in failover order, no enabled route has a weight: {_describe(first)}",
                table_version=version,
                role=first.role,
            )


class RoutePicker:
    """Picks routes from one routing table; immutable (build a new one for a new table)."""

    __slots__ = ("_enabled", "_listed", "_networks", "_unusable", "table", "version")

    def __init__(self, table: RoutingTable, *, enabled: Collection[str] | None = None) -> None:
        """Precompute every network of ``table``. ``enabled``: the routes that may carry traffic
        (None: every route the table does not exclude)."""
        self.table = table
        self.version = table.version
        self._enabled = None if enabled is None else frozenset(enabled)
        self._networks: dict[str, _Network] = {}
        self._unusable: dict[str, str] = {}
        self._listed: dict[str, dict[str, str]] = {}
        for mcc_mnc, choices in table.networks.items():
            self._listed[mcc_mnc] = {c.route: c.role for c in reversed(choices)}
            net = _Network(choices, self._enabled, table.version)
            if net.routes or net.fallback is not None:
                self._networks[mcc_mnc] = net
            else:
                excluded = sum(c.role == "excluded" for c in choices)
                self._unusable[mcc_mnc] = (
                    f"no usable route for network {mcc_mnc} in routing table version {table.version}: "
                    f"{len(choices)} listed, {excluded} excluded, "
                    f"{len(choices) - excluded} not enabled"
                )

    def pick(self, mcc_mnc: str, *, u: float | None = None, pinned: str | None = None) -> Decision:
        """The route for one message to ``mcc_mnc``: a weighted pick by ``u`` (uniform in [0, 1),
        ``random.random()`` when None), or ``pinned``. :class:`NoRoute` when none can carry it."""
        if pinned is not None:
            return self._pinned(mcc_mnc, pinned)
        net = self._networks.get(mcc_mnc)
        if net is None:
            raise NoRoute(
                self._unusable.get(mcc_mnc)
                or f"network {mcc_mnc} is not in routing table version {self.version}"
            )
        if net.fallback is not None:
            return net.fallback
        if u is None:
            u = random.random()
        elif not 0.0 <= u < 1.0:
            raise ValueError(f"u must be in [0, 1), got {u}")
        cumulative = net.cumulative
        i = bisect_right(cumulative, u * net.total)
        if i == len(cumulative):  # u * total rounded up to the last bound
            i -= 1
        return Decision(
            net.routes[i],
            net.failovers[i],
            f"weighted pick {u:.3f} {net.reasons[i]}",
            self.version,
            net.roles[i],
        )

    def _pinned(self, mcc_mnc: str, route: str) -> Decision:
        if self._enabled is not None and route not in self._enabled:
            raise NoRoute(f"route {route!r} is pinned for network {mcc_mnc} but is not enabled")
        role = self._listed.get(mcc_mnc, {}).get(route, "unlisted")
        return Decision(route, (), f"pinned to {route} (test of that route)", self.version, role)

    def next_after(self, decision: Decision, failed: Collection[str]) -> str | None:
        """The route to fail over to: the first of the decision's failover routes not in
        ``failed`` (and still enabled in this picker); None when none is left."""
        enabled = self._enabled
        for route in decision.failover:
            if route not in failed and (enabled is None or route in enabled):
                return route
        return None

    def networks(self) -> frozenset[str]:
        """The networks a weighted pick can serve."""
        return frozenset(self._networks)
