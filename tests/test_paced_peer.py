"""The throughput benchmark's minipaged and vLLM runs take turns (benchmarks/paced_peer.py):
the peer runs a timed repeat only when told to, so no two timed runs overlap and each
pair of runs meets the same state of the machine.

vLLM itself is not run here (it needs `make bench-peers`): a stand-in peer script speaks
the same protocol as benchmarks/peers/vllm_offline.py in its paced mode (its warm-ups
all come before its first READY, so nothing of it runs outside its turns).
"""

from __future__ import annotations

import sys
import textwrap

import pytest

from minipaged.benchmarks.paced_peer import PacedPeer
from minipaged.benchmarks.throughput import paired_note

FAKE_PEER = textwrap.dedent("""
    import json, sys, time
    job = json.load(open(sys.argv[1]))
    events = open(job["events"], "a")
    runs = {}
    for name in job["workloads"]:
        walls = []
        for i in range(job["repeats"]):
            print(f"READY {name} {i}", flush=True)
            if sys.stdin.readline().strip() != "GO":
                sys.exit("no GO")
            events.write(f"peer {name} {i}\\n"); events.flush()
            walls.append(2.0)
            print(f"DONE {name} {i}", flush=True)
        runs[name] = dict(wall_s=min(walls), all_wall_s=walls, outputs=[])
    if job.get("crash"):
        sys.exit("the peer fell over")
    print("some log line the driver ignores", flush=True)
    print("RESULT " + json.dumps(dict(startup_s=1.0, version="fake", runs=runs)), flush=True)
""")


@pytest.fixture
def fake_peer(tmp_path):
    script = tmp_path / "fake_peer.py"
    script.write_text(FAKE_PEER)
    events = tmp_path / "events.txt"

    def start(**job_extra) -> PacedPeer:
        job = dict(events=str(events), workloads={"a": [], "b": []}, repeats=2, **job_extra)
        return PacedPeer([sys.executable, str(script)], job, {}, timeout_s=60,
                         log=tmp_path / "peer.log")
    return start, events


def drive(peer: PacedPeer, events, workloads=("a", "b"), repeats=2) -> None:
    """What run_minipaged does with `turns`: a pair of timed runs per repeat."""
    def mine(name, i):
        with open(events, "a") as f:
            f.write(f"mine {name} {i}\n")
        return i
    for name in workloads:
        for i in range(repeats):
            assert peer.pair(name, i, 0, lambda: mine(name, i)) == i


def test_the_paced_runs_pair_up_with_the_drivers_first_on_even_turns(fake_peer):
    start, events = fake_peer
    with start() as peer:
        drive(peer, events)
        result = peer.result()
    assert events.read_text().split("\n")[:-1] == [
        "mine a 0", "peer a 0", "peer a 1", "mine a 1",
        "mine b 0", "peer b 0", "peer b 1", "mine b 1"]
    assert result["runs"]["a"]["all_wall_s"] == [2.0, 2.0]


def test_the_peers_whole_output_is_kept_in_its_log(fake_peer, tmp_path):
    start, events = fake_peer
    with start() as peer:
        drive(peer, events)
        peer.result()
    log = (tmp_path / "peer.log").read_text()
    assert "READY a 0" in log and "some log line the driver ignores" in log


def test_a_peer_that_exits_without_a_result_raises_with_the_tail_of_its_output(fake_peer):
    start, events = fake_peer
    with start(crash=True) as peer:
        drive(peer, events)
        with pytest.raises(RuntimeError, match="the peer fell over"):
            peer.result()


def test_a_peer_out_of_step_with_the_driver_raises_naming_the_line_it_expected(fake_peer):
    start, events = fake_peer
    with start() as peer:
        with pytest.raises(RuntimeError, match="expected 'READY b 0', got 'READY a 0'"):
            peer.ready("b 0")


def test_leaving_the_peer_early_ends_its_process(fake_peer):
    start, events = fake_peer
    with start() as peer:
        peer.ready("a 0")
    assert peer.proc.poll() is not None


def test_the_paired_note_gives_each_turns_speed_ratio_and_their_median():
    mine = {"sharegpt": {"all_wall_s": [10.0, 12.0, 11.0]}}
    theirs = {"sharegpt": {"all_wall_s": [12.0, 12.0, 13.2]}}
    note = paired_note(mine, theirs, "vLLM")
    assert "sharegpt: 1.20 1.00 1.20 (median 1.20)" in note


def test_the_vllm_driver_speaks_the_protocol_the_stand_in_does():
    from minipaged.benchmarks import workload

    source = (workload.PEERS_DIR / "vllm_offline.py").read_text()
    assert source.index("warm, use_tqdm=False") < source.index('print(f"READY')
    for line in ('print(f"READY {name} {i}", flush=True)', '!= "GO"',
                 'print(f"DONE {name} {i}", flush=True)', 'print("RESULT " + json.dumps('):
        assert line in source and line in FAKE_PEER
