"""Route picks: shares over many picks match the table's weights (exploration included), excluded
routes never carry traffic, failover order, pinned routes, unknown networks, table swaps."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime

import pytest

from controller.sender.choose import Decision, NoRoute, RoutePicker
from probe_agent.protocol import RouteChoice, RoutingTable

NET = "26202"
OTHER = "20810"
PICKS = 100_000
#: Absolute tolerance on a share over PICKS draws: > 9 standard deviations at p = 0.5.
TOLERANCE = 0.015


def choice(route: str, weight: float, role: str, score: float | None = 0.8, reason: str = "") -> RouteChoice:
    return RouteChoice.model_validate(
        {
            "route": route,
            "weight": weight,
            "score": score,
            "role": role,
            "reason": reason or f"{route} reason",
        }
    )


CHOICES = [
    choice("direct", 0.80, "primary", 0.93, "best score: 99.1% delivered, p50 2.1 s"),
    choice("agg-a", 0.10, "backup", 0.88),
    choice("agg-b", 0.05, "backup", 0.85),
    choice("agg-c", 0.0, "backup", 0.70),
    choice("newbie", 0.03, "exploration", None),
    choice("stale", 0.02, "exploration", None),
    choice("grey", 0.0, "excluded", 0.2, "below exclude_below"),
]


def table(version: int = 3, networks: dict[str, list[RouteChoice]] | None = None) -> RoutingTable:
    return RoutingTable(
        version=version,
        created_at=datetime(2026, 3, 2, 12, tzinfo=UTC),
        exploration_share=0.05,
        networks=networks if networks is not None else {NET: CHOICES},
    )


def shares(picker: RoutePicker, network: str = NET, picks: int = PICKS, seed: int = 7) -> dict[str, float]:
    rng = random.Random(seed)
    counts = Counter(picker.pick(network, u=rng.random()).route for _ in range(picks))
    return {route: n / picks for route, n in counts.items()}


def test_shares_match_weights() -> None:
    got = shares(RoutePicker(table()))
    for c in CHOICES:
        assert got.get(c.route, 0.0) == pytest.approx(c.weight, abs=TOLERANCE), c.route
    assert got["newbie"] + got["stale"] == pytest.approx(0.05, abs=TOLERANCE)  # the exploration share
    assert "grey" not in got and "agg-c" not in got


def test_shares_without_u_use_random() -> None:
    random.seed(11)
    picker = RoutePicker(table())
    counts = Counter(picker.pick(NET).route for _ in range(20_000))
    assert counts["direct"] / 20_000 == pytest.approx(0.80, abs=0.02)
    assert "grey" not in counts


def test_excluded_never_picked_even_with_a_weight() -> None:
    odd = [choice("a", 0.5, "primary"), choice("x", 0.5, "excluded")]
    picker = RoutePicker(table(networks={NET: odd}))
    assert set(shares(picker, picks=10_000)) == {"a"}
    assert picker.pick(NET, u=0.99).failover == ()


def test_bounds_of_u() -> None:
    picker = RoutePicker(table())
    assert picker.pick(NET, u=0.0).route == "direct"
    assert picker.pick(NET, u=0.7999).route == "direct"
    assert picker.pick(NET, u=0.8001).route == "agg-a"
    assert picker.pick(NET, u=0.9999999).route == "stale"
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="u must be"):
            picker.pick(NET, u=bad)


def test_decision_failover_and_reason() -> None:
    picker = RoutePicker(table())
    d = picker.pick(NET, u=0.853)
    assert d == Decision(
        route="agg-a",
        failover=("direct", "agg-b", "agg-c", "newbie", "stale"),
        reason="weighted pick 0.853 of 5 routes: backup, score 0.88 — agg-a reason",
        table_version=3,
        role="backup",
    )
    primary = picker.pick(NET, u=0.1)
    assert primary.failover == ("agg-a", "agg-b", "agg-c", "newbie", "stale")
    assert primary.reason.endswith("primary, score 0.93 — best score: 99.1% delivered, p50 2.1 s")
    explore = picker.pick(NET, u=0.97)
    assert (explore.route, explore.role) == ("newbie", "exploration")
    assert "exploration, unscored" in explore.reason
    assert explore.failover == ("direct", "agg-a", "agg-b", "agg-c", "stale")


def test_failover_order_is_ranked_then_exploration_whatever_the_table_order() -> None:
    shuffled = [CHOICES[4], CHOICES[0], CHOICES[6], CHOICES[1], CHOICES[5], CHOICES[2]]
    picker = RoutePicker(table(networks={NET: shuffled}))
    d = picker.pick(NET, u=0.5)
    assert d.route == "direct"
    assert d.failover == ("agg-a", "agg-b", "newbie", "stale")


def test_failover_cached_per_route() -> None:
    picker = RoutePicker(table())
    assert picker.pick(NET, u=0.1).failover is picker.pick(NET, u=0.2).failover


def test_next_after() -> None:
    picker = RoutePicker(table())
    d = picker.pick(NET, u=0.1)
    assert picker.next_after(d, {"direct"}) == "agg-a"
    assert picker.next_after(d, {"direct", "agg-a"}) == "agg-b"
    assert picker.next_after(d, {"direct", "agg-a", "agg-b", "agg-c", "newbie"}) == "stale"
    assert picker.next_after(d, {"direct", "agg-a", "agg-b", "agg-c", "newbie", "stale"}) is None


def test_enabled_filters_and_renormalises() -> None:
    picker = RoutePicker(table(), enabled={"agg-a", "agg-b", "newbie", "grey"})
    got = shares(picker, picks=50_000)
    assert set(got) == {"agg-a", "agg-b", "newbie"}
    assert got["agg-a"] == pytest.approx(0.10 / 0.18, abs=TOLERANCE)
    assert got["newbie"] == pytest.approx(0.03 / 0.18, abs=TOLERANCE)
    assert picker.pick(NET, u=0.0).failover == ("agg-b", "newbie")


def test_only_zero_weight_routes_enabled_takes_the_first_in_failover_order() -> None:
    picker = RoutePicker(table(), enabled={"agg-c"})
    d = picker.pick(NET, u=0.3)
    assert (d.route, d.failover, d.role) == ("agg-c", (), "backup")
    assert d.reason.startswith("first in failover order")


def test_pinned() -> None:
    picker = RoutePicker(table(networks={NET: CHOICES, OTHER: []}))
    d = picker.pick(NET, pinned="grey")  # excluded in the table, but under test
    assert d == Decision("grey", (), "pinned to grey (test of that route)", 3, "excluded")
    assert picker.pick(NET, pinned="agg-b", u=0.0).role == "backup"
    assert picker.pick("99999", pinned="new-route").role == "unlisted"  # network not in the table
    assert picker.next_after(d, {"grey"}) is None
    restricted = RoutePicker(table(), enabled={"direct", "grey"})
    assert restricted.pick(NET, pinned="grey").route == "grey"
    with pytest.raises(NoRoute, match="'agg-a' is pinned for network 26202 but is not enabled"):
        restricted.pick(NET, pinned="agg-a")


def test_unknown_network_and_no_usable_route() -> None:
    excluded_only = [choice("grey", 0.0, "excluded", 0.1)]
    picker = RoutePicker(table(networks={NET: CHOICES, OTHER: excluded_only, "23415": []}))
    with pytest.raises(NoRoute, match="network 99999 is not in routing table version 3"):
        picker.pick("99999", u=0.5)
    with pytest.raises(NoRoute, match=r"no usable route for network 20810 .* 1 excluded") as info:
        picker.pick(OTHER, u=0.5)
    assert isinstance(info.value, LookupError)
    with pytest.raises(NoRoute, match="no usable route for network 23415"):
        picker.pick("23415")
    with pytest.raises(NoRoute, match="no usable route"):
        RoutePicker(table(), enabled={"elsewhere"}).pick(NET)
    assert picker.networks() == frozenset({NET})


def test_table_swap_keeps_in_flight_decisions() -> None:
    old = RoutePicker(table(version=3))
    in_flight = old.pick(NET, u=0.1)
    new_choices = [
        choice("agg-b", 0.9, "primary"),
        choice("agg-a", 0.1, "backup"),
        choice("direct", 0, "excluded"),
    ]
    new = RoutePicker(table(version=4, networks={NET: new_choices, OTHER: [choice("agg-a", 1.0, "primary")]}))
    current = old
    current = new  # the swap: one reference
    assert in_flight.table_version == 3 and in_flight.route == "direct"
    assert current.next_after(in_flight, {"direct"}) == "agg-a"  # its own failover, not the new table's
    fresh = current.pick(NET, u=0.1)
    assert (fresh.route, fresh.table_version, fresh.failover) == ("agg-b", 4, ("agg-a",))
    assert current.pick(OTHER, u=0.5).route == "agg-a"
    assert old.pick(NET, u=0.1).route == "direct"  # the old picker is untouched
    disabled = RoutePicker(table(version=5), enabled={"direct", "agg-b"})
    assert disabled.next_after(in_flight, {"direct"}) == "agg-b"  # agg-a was disabled since
