"""The peer table on its own: online/offline, reporter, eligibility, preference, leases."""

from __future__ import annotations

from sheri_trio.swarm._presence import PeerTable, PresenceKind, rendezvous_score


def table() -> PeerTable:
    t = PeerTable("m")
    t.observe("m", PresenceKind.ALIVE, 0.0, role="testing")
    t.observe("a", PresenceKind.ALIVE, 0.0, role="monitoring")
    t.observe("z", PresenceKind.ALIVE, 0.0, role="testing")
    return t


def test_a_shutdown_is_gone_a_will_only_offline() -> None:
    t = table()
    assert t.observe("z", PresenceKind.LEFT, 1.0) is True
    assert t.observe("nobody", PresenceKind.LEFT, 1.0) is False
    # an offline status (a last will) is no takeover: mosquitto sends every will as it
    # stops, so a broker's restart looks the same; only the lease decides
    assert t.observe("a", PresenceKind.STATUS, 1.0, online=False) is False
    assert t.online_ids() == ["m"]
    assert t.lease_expired("z", 0.0, 1.0, 30.0)  # shut down: gone at once
    assert not t.lease_expired("a", 0.0, 1.0, 30.0)  # offline by its will: not yet
    assert t.lease_expired("a", 0.0, 30.0, 30.0)  # silent for the lease
    assert t.observe("a", PresenceKind.STATUS, 2.0, online=True) is False
    assert t["a"].last_seen == 2.0
    assert not t.lease_expired("a", 0.0, 31.0, 30.0)  # back: its lease runs from then


def test_the_reporter_is_the_smallest_online_id_among_those_concerned() -> None:
    t = table()
    assert not t.is_reporter()  # "a" is smaller
    assert t.is_reporter(roles=("testing",))  # among testing agents, "m" is
    # asked by an agent concerned by the task (the only ones that know it)
    z = PeerTable("z")
    for agent_id in ("m", "a", "z"):
        z.observe(agent_id, PresenceKind.ALIVE, 0.0, role="testing")
    assert z.is_reporter(roles=("testing",), assigned_to="z")
    assert not z.is_reporter(roles=("testing",))
    t.observe("a", PresenceKind.LEFT, 1.0)
    assert t.is_reporter()


def test_eligibility_looks_at_online_agents_of_the_roles() -> None:
    t = table()
    assert t.anyone_eligible(("monitoring",), None)
    assert not t.anyone_eligible(("deployment",), None)
    assert not t.anyone_eligible(("monitoring",), "z")
    t.observe("a", PresenceKind.LEFT, 1.0)
    assert not t.anyone_eligible(("monitoring",), None)


def test_preference_is_the_highest_rendezvous_score_among_eligible_online_peers() -> None:
    t = table()
    for task_id in (f"t{i}" for i in range(20)):
        mine = rendezvous_score(f"{task_id}/m") > rendezvous_score(f"{task_id}/z")
        assert t.preferred(task_id, ("testing",)) is mine
        assert t.preferred(task_id, ("deployment",)) is True  # nobody else may take it


def test_a_lease_runs_out_after_silence_or_at_once_when_offline() -> None:
    t = table()
    assert not t.lease_expired("z", since=5.0, now=34.9, lease=30.0)
    assert t.lease_expired("z", since=5.0, now=35.0, lease=30.0)
    t.observe("z", PresenceKind.ALIVE, 20.0, role="testing")
    assert not t.lease_expired("z", since=5.0, now=35.0, lease=30.0)  # heard at 20
    t.observe("z", PresenceKind.LEFT, 21.0)
    assert t.lease_expired("z", since=5.0, now=21.0, lease=30.0)
    assert t.lease_expired("never-seen", since=0.0, now=30.0, lease=30.0)


def test_the_view_leaves_ourselves_out() -> None:
    t = table()
    view = t.view(3.0)
    assert [v["agent_id"] for v in view] == ["a", "z"]
    assert view[0] == {"agent_id": "a", "role": "monitoring", "online": True, "last_seen_age": 3.0}
