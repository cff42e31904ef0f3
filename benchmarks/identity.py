"""Token identity of greedy outputs: does an engine produce exactly the reference's
tokens, and where it does not, is the first difference a float32 near-tie?

Two correct fp32 engines may sum in different orders; when the reference model's two
best logits at a position are closer than that rounding, argmax may flip and the rest of
the output follows a different, equally valid path. So each first difference is judged by
the reference model's top-2 logit gap there: below NEAR_TIE it is counted as a near-tie,
above it as a real disagreement.

Invariant: the gap is measured by the reference model on the reference's own prefix, so
a wrong engine cannot excuse itself.
"""

from __future__ import annotations

import torch

NEAR_TIE = 1e-4                      # top-2 logit gap below which fp32 noise can flip argmax


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def top2_gap(model, prompt: list[int], prefix: list[int]) -> float:
    """The reference model's top-2 logit gap for the token after prompt + prefix."""
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + prefix])).logits[0, -1].float()
    top = torch.topk(logits, 2).values
    return float(top[0] - top[1])


def identity(ours: list[list[int]], reference: list[list[int]], prompts: list[list[int]],
             model) -> dict:
    """Share of outputs equal to the reference, and the near-ties among the others."""
    n = len(reference)
    diverging = [(i, d) for i in range(n)
                 if (d := first_divergence(ours[i], reference[i])) is not None]
    gaps = [top2_gap(model, prompts[i], reference[i][:d]) for i, d in diverging]
    near = sum(g < NEAR_TIE for g in gaps)
    return dict(compared=n, identical=n - len(diverging), near_ties=near,
                other_diffs=len(diverging) - near,
                gaps=[round(g, 6) for g in gaps],
                first_diff_at=[d for _, d in diverging])
