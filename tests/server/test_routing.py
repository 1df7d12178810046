"""The traffic split between a model's versions, decided purely: a canary's weights held
over many users, each user kept on one version, unready versions left out, the shadow
draw, and every malformed route refused with its reason."""

from __future__ import annotations

from collections import Counter

import pytest

from server.routing import Route, parse_patch, parse_routes, pick, point, shadows

USERS = [f"user-{i}" for i in range(10_000)]


def split(route: Route, ready: set[str], users: list[str] = USERS) -> Counter[str | None]:
    return Counter(pick(route, ready, point("emb", user)) for user in users)


@pytest.mark.parametrize("weights", [(95, 5), (50, 50), (90, 10), (1, 3)])
def test_a_split_over_ten_thousand_users_is_within_two_points_of_its_weights(
    weights: tuple[int, int],
) -> None:
    route = Route((("v1", weights[0]), ("v2", weights[1])))
    counted = split(route, {"v1", "v2"})
    for version, weight in route.weights:
        share = counted[version] / len(USERS)
        assert abs(share - weight / sum(weights)) <= 0.02, (version, share)


def test_one_user_stays_on_one_version_and_a_growing_canary_takes_users_it_never_returns() -> None:
    route = Route((("v1", 95), ("v2", 5)))
    ready = {"v1", "v2"}
    first = {user: pick(route, ready, point("emb", user)) for user in USERS}
    again = {user: pick(route, ready, point("emb", user)) for user in USERS}
    assert first == again, "a key lands on the same version every time"
    grown = Route((("v1", 80), ("v2", 20)))
    later = {user: pick(grown, ready, point("emb", user)) for user in USERS}
    assert all(later[u] == "v2" for u in USERS if first[u] == "v2"), "no canary user goes back"
    moved = sum(1 for u in USERS if first[u] == "v1" and later[u] == "v2")
    assert 0.13 <= moved / len(USERS) <= 0.17, "only the canary's new share moved"


def test_the_key_decides_per_model_and_no_key_draws_at_random() -> None:
    assert point("emb", "alice") == point("emb", "alice")
    assert point("emb", "alice") != point("rerank", "alice")
    draws = {point("emb", None) for _ in range(100)}
    assert len(draws) == 100
    assert all(0.0 <= d < 1.0 for d in draws)


def test_versions_not_ready_are_left_out_and_the_rest_share_their_weight() -> None:
    route = Route((("v1", 50), ("v2", 30), ("v3", 20)))
    counted = split(route, {"v1", "v3"})
    assert set(counted) == {"v1", "v3"}
    assert abs(counted["v1"] / len(USERS) - 50 / 70) <= 0.02
    assert split(route, set(), USERS[:10]) == Counter({None: 10})
    assert pick(Route((("v1", 0), ("v2", 1))), {"v1"}, 0.3) is None, "a weight of 0 takes none"


def test_a_shadow_takes_its_share_of_the_draws_and_never_shadows_the_answering_version() -> None:
    route = Route((("v1", 1),), (("v2", 0.2), ("v3", 1.0)))
    ready = {"v1", "v2", "v3"}
    assert shadows(route, "v1", ready, 0.1) == ["v2", "v3"]
    assert shadows(route, "v1", ready, 0.5) == ["v3"]
    assert shadows(route, "v3", ready, 0.1) == ["v2"], "v3 answered: it is not its own shadow"
    assert shadows(route, "v1", {"v1", "v2"}, 0.1) == ["v2"], "an unready shadow is skipped"


def test_a_patch_changes_only_what_it_names() -> None:
    route = Route((("v1", 100),), (("v2", 0.5),))
    weights_only = parse_patch({"v1": 90, "v2": 10}, "emb").applied_to(route)
    assert weights_only == Route((("v1", 90), ("v2", 10)), (("v2", 0.5),))
    shadow_only = parse_patch({"shadow": {}}, "emb").applied_to(route)
    assert shadow_only == Route((("v1", 100),), ())
    assert route.without("v2") == Route((("v1", 100),), ())


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ([95, 5], "give an object of version weights"),
        ({"v1": -1}, "a weight is a whole number >= 0, got -1"),
        ({"v1": 0.5}, "a weight is a whole number >= 0, got 0.5"),
        ({"v1": True}, "a weight is a whole number >= 0, got True"),
        ({"v1": 0, "v2": 0}, "at least one version needs a weight above 0"),
        ({"shadow": {"v2": 1.5}}, "a shadow share is between 0 and 1, got 1.5"),
        ({"shadow": ["v2"]}, "give an object of shares"),
    ],
)
def test_a_malformed_entry_is_refused_with_its_reason(entry: object, reason: str) -> None:
    with pytest.raises(ValueError, match=reason.replace("(", r"\(")):
        parse_patch(entry, "emb")


def test_the_route_flag_is_json_of_entries() -> None:
    parsed = parse_routes('{"emb": {"v1": 95, "v2": 5, "shadow": {"v3": 0.2}}}')
    assert parsed["emb"].weights == (("v1", 95), ("v2", 5))
    assert parsed["emb"].shadow == (("v3", 0.2),)
    with pytest.raises(ValueError, match="--route is not JSON"):
        parse_routes("emb=v1:95")
    with pytest.raises(ValueError, match="give an object"):
        parse_routes("[1]")
