"""The routing document: what a replica accepts from the control topic, and the changes the CLI makes."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from fraudactors.engine.decision import Router
from fraudactors.engine.routing import Routing
from fraudactors.errors import RoutingRefused
from fraudactors.settings import ModelSettings, VariantSettings

SHA = "a" * 64


def base() -> Routing:
    return Routing.from_settings(ModelSettings())


def doc(**changes: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {"revision": 3, "variants": {"A": {"version": "v1", "weight": 0.9, "shadow": False},
                                                       "B": {"version": "v2", "weight": 0.1, "shadow": False}},
                           "models": {"v1": SHA}, "issued_at": "2026-12-01T20:00:00+00:00", "reason": "test"}
    obj.update(changes)
    return obj


def test_the_configuration_is_revision_zero_and_round_trips_through_json() -> None:
    routing = base()
    assert routing.revision == 0 and routing.previous is None
    assert routing.variants == {"A": VariantSettings("v1", 0.9), "B": VariantSettings("v2", 0.1)}
    assert routing.versions == ("v1", "v2")
    again = Routing.from_json(routing.to_json())
    assert again == routing


def test_a_document_with_its_previous_round_trips_and_keeps_one_level() -> None:
    first = base().with_weights({"A": 0.5, "B": 0.5}, {"v1": SHA})
    second = first.promoted("v3", "C", {"v3": "b" * 64}, shadow=True)
    assert second.revision == 2 and second.previous is not None and second.previous.revision == 1
    assert second.previous.previous is None, "previous is one level deep"
    parsed = Routing.from_json(second.to_json())
    assert parsed == second
    assert parsed.models == {"v1": SHA, "v3": "b" * 64}


@pytest.mark.parametrize(("changes", "problem"), [
    ({"revision": "3"}, "revision must be an integer"),
    ({"revision": -1}, "revision must be >= 0"),
    ({"variants": {}}, "no variants"),
    ({"variants": {"A": {"version": "../../etc", "weight": 1.0}}}, "version '../../etc'"),
    ({"variants": {"A": {"version": ".hidden", "weight": 1.0}}}, "version '.hidden'"),
    ({"variants": {"A/x": {"version": "v1", "weight": 1.0}}}, "variant name 'A/x'"),
    ({"variants": {"A": {"version": "v1", "weight": -0.5}}}, "weight must be a finite number >= 0"),
    ({"variants": {"A": {"version": "v1", "weight": True}}}, "weight must be a number"),
    ({"variants": {"A": {"version": "v1", "weight": 1.0, "colour": "red"}}}, "must be {version, weight, shadow}"),
    ({"variants": {"A": {"version": "v1", "weight": 0.0}}}, "at least one variant must decide"),
    ({"variants": {"A": {"version": "v1", "shadow": True}}}, "at least one variant must decide"),
    ({"models": {"v1": "not-a-sha"}}, "is not a sha256"),
    ({"extra": 1}, "unknown key(s) ['extra']"),
    ({"previous": doc(revision=3)}, "previous revision 3 is not older than 3"),
    ({"previous": doc(revision=1, previous=doc(revision=0))}, "previous must not nest"),
])
def test_an_invalid_document_is_refused_naming_the_problem(changes: dict[str, Any], problem: str) -> None:
    with pytest.raises(RoutingRefused, match="routing refused") as info:
        Routing.from_json(orjson.dumps(doc(**changes)))
    assert problem in str(info.value)


def test_bytes_that_are_not_json_are_refused() -> None:
    with pytest.raises(RoutingRefused, match="not JSON"):
        Routing.from_json(b"\xff{")


def test_set_weights_changes_only_the_named_variants() -> None:
    new = base().with_weights({"B": 0.3}, {})
    assert new.variants["A"].weight == 0.9 and new.variants["B"].weight == 0.3
    assert new.reason == "set-weights B=0.3"
    with pytest.raises(RoutingRefused, match="no variant Z"):
        base().with_weights({"Z": 0.5}, {})
    with pytest.raises(RoutingRefused, match="at least one variant must decide"):
        base().with_weights({"A": 0.0, "B": 0.0}, {})
    shadowed = base().promoted("v3", "C", {}, shadow=True)
    with pytest.raises(RoutingRefused, match="variant C is a shadow"):
        shadowed.with_weights({"C": 0.2}, {})


def test_promote_puts_a_version_in_a_variant() -> None:
    same_weight = base().promoted("v3", "A", {})
    assert same_weight.variants["A"] == VariantSettings("v3", 0.9, False)
    shadow = base().promoted("v3", "C", {}, shadow=True)
    assert shadow.variants["C"] == VariantSettings("v3", 0.0, True)
    assert Router(shadow.variants).shadows[0].version == "v3"
    deciding = shadow.promoted("v3", "C", {}, weight=0.1)
    assert deciding.variants["C"] == VariantSettings("v3", 0.1, False) and deciding.revision == 2
    with pytest.raises(RoutingRefused, match="variant C is new: give it a weight"):
        base().promoted("v3", "C", {})
    with pytest.raises(RoutingRefused, match="variant C is a shadow: give it a weight"):
        shadow.promoted("v3", "C", {})
    with pytest.raises(RoutingRefused, match=r"version '\.\./x'"):
        base().promoted("../x", "A", {})


def test_pins_are_kept_only_for_versions_still_routed() -> None:
    pinned = base().promoted("v3", "A", {"v3": SHA})
    assert pinned.models == {"v3": SHA}
    replaced = pinned.promoted("v4", "A", {"v4": "c" * 64})
    assert replaced.models == {"v4": "c" * 64}


def test_rollback_restores_the_previous_routing_as_a_new_revision() -> None:
    first = base().with_weights({"A": 0.5, "B": 0.5}, {})
    back = first.rolled_back()
    assert back.revision == 2 and back.variants == base().variants
    assert back.previous is not None and back.previous.variants == first.variants
    assert back.reason == "rollback to revision 0"
    again = back.rolled_back()
    assert again.revision == 3 and again.variants == first.variants, "a second rollback undoes the first"
    with pytest.raises(RoutingRefused, match="revision 0 has no previous routing"):
        base().rolled_back()
