"""The end-to-end benchmarks (throughput against transformers, online serving) run in their
--smoke mode on a tiny random LLaMA and write their table, CSV and plot; minipaged's greedy
outputs equal transformers' on it. No timing is asserted: only that timings are there,
finite and positive (the peers' vLLM is not run here: it needs `make bench-peers`).
"""

from __future__ import annotations

import math

import pytest

from minipaged.benchmarks import common, fused_decode, serving, serving_report, throughput


@pytest.fixture(scope="module")
def throughput_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("throughput")
    assert throughput.main(["--smoke", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def serving_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("serving")
    assert serving.main(["--smoke", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("fixture,name", [("throughput_out", "throughput"),
                                          ("serving_out", "serving")])
def test_each_end_to_end_benchmark_writes_a_csv_a_plot_and_a_markdown_table(
        request, fixture, name):
    out = request.getfixturevalue(fixture)
    for suffix in ("csv", "png", "md"):
        assert (out / f"{name}.{suffix}").stat().st_size > 0
    assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    text = (out / f"{name}.md").read_text()
    assert text.startswith("| ") and f"python -m benchmarks.{name} --smoke" in text
    assert "peers that ran: none" in text      # the smoke modes never start vLLM


def test_throughput_measures_every_engine_on_every_workload(throughput_out):
    rows = common.read_csv(throughput_out / "throughput.csv")
    engines = {r["engine"] for r in rows}
    assert engines == {"minipaged", "minipaged, float32 weight reads",
                       "minipaged, decode steps in Python",
                       "minipaged, float32 LM head for greedy rows",
                       "transformers static, batch 1", "transformers static, batch 4",
                       "transformers continuous batching"}
    assert {r["workload"] for r in rows} == {"sharegpt", "alpaca"}
    for r in rows:
        assert math.isfinite(float(r["tokens_per_s"])) and float(r["tokens_per_s"]) > 0
        assert 0 < float(r["peak_share_with_prompts"]) and float(r["peak_share"]) >= 0


def test_minipaged_greedy_outputs_equal_transformers_on_the_smoke_model(throughput_out):
    rows = common.read_csv(throughput_out / "throughput_identity.csv")
    mine = [r for r in rows if r["engine"] == "minipaged"]
    assert {r["reference"] for r in mine} == {"transformers static, batch 1",
                                               "transformers static, batch 4"}
    assert len(mine) == 4
    for r in mine:
        # every output token-identical to transformers' batch-1 greedy one, or its first
        # difference a float32 near-tie of the reference logits (top-2 gap < 1e-4)
        assert int(r["identical"]) + int(r["near_ties"]) == int(r["compared"]) > 0


def test_serving_measures_both_minipaged_modes_at_every_rate(serving_out):
    rows = common.read_csv(serving_out / "serving.csv")
    systems = {r["system"] for r in rows}
    assert "minipaged" in systems and any("static batching" in s for s in systems)
    for system in systems:
        rates = sorted(float(r["rate"]) for r in rows if r["system"] == system)
        assert rates == [2.0, 8.0]
    for r in rows:
        assert float(r["normalized_latency"]) > 0 and math.isfinite(float(r["throughput"]))
        assert r["knee_rate"] != ""


def test_the_knee_is_the_last_rate_before_latency_first_doubles():
    points = [dict(rate=1.0, normalized_latency=0.10), dict(rate=2.0, normalized_latency=0.12),
              dict(rate=4.0, normalized_latency=0.19), dict(rate=8.0, normalized_latency=0.9),
              dict(rate=16.0, normalized_latency=0.15)]        # a noisy point past the knee
    assert serving_report.knee(points) == 4.0
    assert serving_report.knee(points, baseline=0.04) is None       # past it even at the lowest


def _event_order(static_batch):
    """Run three requests 0.1 s apart against a fake server whose first request takes
    1 s and the others 0.2 s; the order in which requests start and end."""
    import asyncio

    reqs = [serving.Req(0.1 * i, [1], 4) for i in range(3)]
    events: list[str] = []

    async def fake_send(client, port, req):  # noqa: ANN001
        i = reqs.index(req)
        events.append(f"start {i}")
        await asyncio.sleep(1.0 if i == 0 else 0.2)
        events.append(f"end {i}")
        return req.max_tokens

    original = serving.send
    serving.send = fake_send
    try:
        asyncio.run(serving.run_rate(0, reqs, static_batch))
    finally:
        serving.send = original
    return events


def test_static_batching_admits_a_batch_only_when_the_previous_one_finished():
    events = _event_order(static_batch=8)
    assert events[:2] == ["start 0", "end 0"]                 # 1 and 2 waited for it
    assert sorted(events[2:4]) == ["start 1", "start 2"]      # then left together


def test_continuous_mode_sends_each_request_when_it_arrives():
    events = _event_order(static_batch=None)
    assert events[:3] == ["start 0", "start 1", "start 2"]


@pytest.fixture(scope="module")
def fused_decode_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("fused_decode")
    assert fused_decode.main(["--smoke", "--out", str(out)]) == 0
    return out


def test_the_fused_decode_benchmark_times_both_modes_in_turns_on_every_workload(
        fused_decode_out):
    rows = common.read_csv(fused_decode_out / "fused_decode.csv")
    for workload in ("sharegpt", "alpaca"):
        mine = [r for r in rows if r["workload"] == workload]
        turns = {(int(r["turn"]), r["mode"]) for r in mine}
        assert turns == {(t, m) for t in (0, 1) for m in ("fused", "python")}
        for r in mine:
            assert 0 < float(r["decode_forward_s"]) < float(r["wall_s"])
            # the smoke model's random weights have no exact 4-bit form: never fused
            assert int(r["fused_steps"]) == 0
    assert (fused_decode_out / "fused_decode.png").read_bytes()[:4] == b"\x89PNG"
    text = (fused_decode_out / "fused_decode.md").read_text()
    assert "python -m benchmarks.fused_decode --smoke" in text and "median turn" in text
