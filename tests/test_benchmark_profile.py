"""The profile benchmark (where a real generate's time goes) runs in its --smoke mode on a
tiny random LLaMA: it times every part of a step exclusively, measures each projection in
the run and warm, and leaves the engine as it found it. No timing is asserted: only that
the timings are there, finite and consistent.
"""

from __future__ import annotations

import math

import pytest

from minipaged import LLM, SamplingParams
from minipaged.benchmarks import common, profile
from minipaged.benchmarks.workload import smoke_model
from minipaged.sampler import Sampler


@pytest.fixture(scope="module")
def profile_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    assert profile.main(["--smoke", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    model_dir = smoke_model(tmp_path_factory.mktemp("profile-model"))
    return LLM(model=str(model_dir), max_model_len=128, seed=0, enable_prefix_caching=False)


def test_the_profile_writes_a_csv_a_plot_and_a_markdown_table(profile_out):
    for name in ("profile.csv", "profile_products.csv", "profile.png", "profile.md"):
        assert (profile_out / name).stat().st_size > 0
    assert (profile_out / "profile.png").read_bytes()[:4] == b"\x89PNG"
    text = (profile_out / "profile.md").read_text()
    assert text.startswith("| ") and "python -m benchmarks.profile --smoke" in text


def test_every_part_of_a_step_is_timed_on_every_workload(profile_out):
    rows = common.read_csv(profile_out / "profile.csv")
    for workload in ("sharegpt", "alpaca"):
        mine = {r["part"]: r for r in rows if r["workload"] == workload}
        assert set(mine) == {*profile.PARTS, "whole run", profile.FUSED_RUN}
        assert float(mine[profile.FUSED_RUN]["seconds"]) > 0   # the default run, whole
        for part in profile.PARTS:
            # the generate loop is the remainder, not a wrapped call; greedy rows never
            # reach the sampler (the runner returns their argmax: BatchItem.argmax_only)
            if part not in ("generate loop", "sampler"):
                assert int(mine[part]["calls"]) > 0, part
            assert math.isfinite(float(mine[part]["seconds"]))


def test_part_times_are_exclusive_so_the_remainder_is_never_negative(profile_out):
    # Were a part's time to include its timed callees, the parts would add up to more
    # than the run and the generate loop (the run less every part) would go below zero.
    rows = common.read_csv(profile_out / "profile.csv")
    for r in rows:
        if r["part"] == "generate loop":
            assert float(r["seconds"]) >= -0.001      # the table rounds to 1 ms


def test_each_projection_is_measured_in_the_run_and_warm(profile_out):
    rows = common.read_csv(profile_out / "profile_products.csv")
    decode = {r["product"] for r in rows if r["step"] == "decode"}
    # greedy rows want only the argmax: the LM head is the model's greedy_tokens
    assert decode == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head_greedy"}
    for r in rows:
        assert int(r["rows"]) > 0 and int(r["calls"]) > 0
        for column in ("in_situ_gflops", "warm_gflops", "in_situ_peak_share",
                       "warm_peak_share"):
            assert math.isfinite(float(r[column])) and float(r[column]) > 0, column
        assert float(r["lost_to_memory_s"]) >= 0


def test_the_timers_are_removed_after_the_profiled_run(tiny_llm):
    engine = tiny_llm.llm_engine
    call = Sampler.__call__
    with profile.timed_parts(tiny_llm, profile.PartTimer()):
        assert "forward" in engine.executor.model.layers[0].mlp.__dict__
    for module in engine.executor.model.modules():
        assert "forward" not in module.__dict__ and "compute_logits" not in module.__dict__
    assert not {"forward", "paged_attention_decode", "paged_attention_prefill",
                "reshape_and_cache"} & set(vars(engine.executor.backend))
    assert "_step" not in vars(engine) and "schedule" not in vars(engine.scheduler)
    assert Sampler.__call__ is call


def test_profiling_does_not_change_what_the_engine_generates(tiny_llm):
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    plain = [o.outputs[0].token_ids for o in tiny_llm.generate(prompts, params,
                                                                use_tqdm=False)]
    timer = profile.PartTimer()
    with profile.timed_parts(tiny_llm, timer):
        timed = [o.outputs[0].token_ids for o in tiny_llm.generate(prompts, params,
                                                                    use_tqdm=False)]
    assert timed == plain
    assert timer.calls["layer products"] > 0 and timer.calls["LM head"] > 0
