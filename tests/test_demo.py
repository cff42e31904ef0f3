"""`make demo`'s main job: the real model answers chat prompts through the paged cache."""

from __future__ import annotations

import pytest

from minipaged import demo


@pytest.mark.slow
def test_demo_answers_with_the_real_model_and_returns_every_block(capsys):
    assert demo.main(["--max-tokens", "12", "--num-gpu-blocks", "64"]) == 0
    out = capsys.readouterr().out
    assert "Q: What is the capital of France?" in out
    assert "Paris" in out
    assert "KV-cache report" in out
    assert "free blocks at the end  64 / 64  (all returned)" in out
