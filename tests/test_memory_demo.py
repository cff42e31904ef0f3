"""The memory-manager demo (`python -m minipaged.memory_demo`, `make memory-demo`)."""

from __future__ import annotations

import re

import pytest

from minipaged import memory_demo as demo

SMALL = ["--steps", "16", "--requests", "5", "--blocks", "16", "--block-size", "4",
         "--max-len", "16", "--width", "40"]


def test_demo_prints_block_maps_and_utilisation_of_paged_and_orca_max(capsys):
    assert demo.main(SMALL) == 0
    out = capsys.readouterr().out
    assert "paged: 16 blocks x 4 slots" in out
    assert re.search(r"^[#=.\-]{4}(\|[#=.\-]{4})+$", out, re.M), "no row of blocks"
    assert re.search(r"^contiguous arena \(max\), 64 slots", out, re.M)
    assert re.search(r"^[#+\-.x]{40}$", out, re.M), "no row of the contiguous arena"
    assert re.search(r"^utilisation +\d+\.\d%", out, re.M)
    assert re.search(r"^Orca \(Max\): mean utilisation \d+\.\d%", out, re.M)
    assert re.search(r"^paged: mean utilisation \d+\.\d%", out, re.M)


def test_demo_output_is_the_same_for_the_same_seed(capsys):
    demo.main(SMALL)
    first = capsys.readouterr().out
    demo.main(SMALL)
    assert capsys.readouterr().out == first


def test_demo_requests_fit_the_context():
    cfg = demo.DemoConfig(max_len=16, num_requests=50)
    assert all(r.final_len <= 16 for r in demo.make_requests(cfg))


def test_demo_refuses_a_context_larger_than_the_memory():
    with pytest.raises(SystemExit, match="max_len"):
        demo.main(["--blocks", "2", "--block-size", "4", "--max-len", "16"])
