"""Placement without processes: least outstanding work, session pinning, prefix slack; CLI argv."""
from __future__ import annotations

import pytest

from tidal.router.cli import _strip
from tidal.router.replicas import DOWN, UP, NoReplica, Replica, ReplicaSet, normalise_url, prefix_key


def _set(*loads: int) -> ReplicaSet:
    rs = ReplicaSet.__new__(ReplicaSet)       # no HTTP client: placement only
    rs.replicas = {f"http://r{i}": Replica(f"http://r{i}", UP, load) for i, load in enumerate(loads)}
    rs.prefix_slack = 2
    from tidal.router.replicas import _Lru
    rs.sessions, rs.prefixes, rs._turn = _Lru(), _Lru(), 0
    return rs


def test_least_outstanding_then_session_pin_then_prefix_within_slack():
    rs = _set(5, 1, 3)
    assert rs.pick().url == "http://r1"
    assert rs.pick(session="s").url == "http://r1"
    rs.replicas["http://r1"].outstanding = 9
    assert rs.pick(session="s").url == "http://r1"          # pinned, whatever the load
    rs.replicas["http://r1"].state = DOWN
    assert rs.pick(session="s").url == "http://r2"          # re-pinned when its replica goes
    key = prefix_key([1, 2, 3])
    assert rs.pick(prefix=key).url == "http://r2"            # r2 (3) is least of r0 (5), r2 (3)
    rs.replicas["http://r2"].outstanding = 5                 # r0 = 5: r2 within slack of the least
    assert rs.pick(prefix=key).url == "http://r2"
    rs.replicas["http://r2"].outstanding = 8                 # beyond the slack: least loaded wins
    assert rs.pick(prefix=key).url == "http://r0"
    for r in rs.replicas.values():
        r.state = DOWN
    with pytest.raises(NoReplica):
        rs.pick()


def test_prefix_key_and_url_checks():
    assert prefix_key([1] * 16 + [2]) == prefix_key([1] * 16 + [3])   # the first block decides
    assert prefix_key("a" * 64 + "x") == prefix_key("a" * 64 + "y")
    assert prefix_key(None) is None
    assert normalise_url("http://h:1/") == "http://h:1"
    with pytest.raises(ValueError, match="url='h:1'"):
        normalise_url("h:1")


def test_data_parallel_child_argv_drops_router_flags():
    argv = ["serve", "M", "--data-parallel-size", "2", "--port=9000", "--host", "0.0.0.0", "--max-num-seqs", "8"]
    assert _strip(argv, {"--data-parallel-size", "--port", "--host"}) == ["serve", "M", "--max-num-seqs", "8"]
