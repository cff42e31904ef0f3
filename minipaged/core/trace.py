"""Request-length traces shaped like the paper's workloads (what `replay` serves).

Paper section 6.1 / Fig. 11: the Alpaca workload has short prompts and outputs (mean
input 19.31, output 58.45 tokens); ShareGPT has 8.4x longer prompts and 5.8x longer
outputs (means 161.31 / 337.99) with a much higher variance. No data set can be fetched
here, so `make_trace` draws lengths from log-normals fitted to those means:

- sigma (the spread of log length): Alpaca 0.6 (coefficient of variation 0.66: the
  Fig. 11 histograms of Alpaca stay within a few times their mean), ShareGPT 1.0 (CV
  1.31: its histograms spread over the whole context with a long tail).
- mu is fitted so that the mean *after* capping at the context (prompt + output <=
  max_len) is the paper's mean, not the mean before the cap, which for ShareGPT at
  2048 would be about 4 % too low.

`minipaged.core.replay` serves such a trace with the real allocators, memory only.

Invariant to keep in mind: the traces are reproducible: the same name, size, seed and
max_len give the same lengths and arrival times on every machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Request:
    prompt_len: int
    output_len: int
    arrival_time: float = 0.0

    @property
    def final_len(self) -> int:
        return self.prompt_len + self.output_len


@dataclass(frozen=True)
class TraceShape:
    """Target means (paper Fig. 11) and log-normal sigmas of one workload."""

    mean_prompt: float
    mean_output: float
    sigma_prompt: float
    sigma_output: float


TRACE_SHAPES = {
    "alpaca": TraceShape(19.31, 58.45, 0.6, 0.6),
    "sharegpt": TraceShape(161.31, 337.99, 1.0, 1.0),
}


def capped_lognormal_mean(mu: float, sigma: float, cap: float) -> float:
    """E[min(X, cap)] for X ~ LogNormal(mu, sigma), in closed form."""
    phi = lambda z: 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))  # noqa: E731
    z = (math.log(cap) - mu) / sigma
    return math.exp(mu + sigma**2 / 2) * phi(z - sigma) + cap * (1.0 - phi(z))


def fit_mu(mean: float, sigma: float, cap: float) -> float:
    """The mu whose log-normal, capped at ``cap``, has this mean (bisection).

    Starts from the uncapped fit ``log(mean) - sigma^2 / 2`` (a capped mean can only be
    smaller) and searches up to 3 above it; if the cap is so tight that even that falls
    short, lengths simply pile up at the cap.
    """
    lo = math.log(mean) - sigma**2 / 2
    hi = lo + 3.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if capped_lognormal_mean(mid, sigma, cap) < mean:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def make_trace(name: str, num_requests: int, seed: int = 0, max_len: int = 2048,
               request_rate: float | None = None) -> list[Request]:
    """``num_requests`` requests with Alpaca- or ShareGPT-shaped lengths, seeded.

    Every request has prompt_len >= 1, output_len >= 1 and prompt + output <= max_len.
    With ``request_rate`` (requests per second) arrivals are a Poisson process;
    without one, every request arrives at time 0.
    """
    if name not in TRACE_SHAPES:
        raise ValueError(f"name must be one of {sorted(TRACE_SHAPES)}, got {name!r}")
    if num_requests < 0:
        raise ValueError(f"num_requests must be >= 0, got {num_requests}")
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2 (one prompt and one output token), got {max_len}")
    if request_rate is not None and not request_rate > 0:
        raise ValueError(f"request_rate must be > 0 or None, got {request_rate}")
    shape = TRACE_SHAPES[name]
    rng = np.random.default_rng(seed)
    mu_p = fit_mu(shape.mean_prompt, shape.sigma_prompt, max_len - 1)
    # The output's cap is what the prompt leaves of the context; fit to a typical one.
    mu_o = fit_mu(shape.mean_output, shape.sigma_output, max(1.0, max_len - shape.mean_prompt))
    prompt = np.clip(np.rint(rng.lognormal(mu_p, shape.sigma_prompt, num_requests)),
                     1, max_len - 1).astype(int)
    output = np.rint(rng.lognormal(mu_o, shape.sigma_output, num_requests)).astype(int)
    output = np.clip(output, 1, max_len - prompt)
    if request_rate is None:
        arrival = np.zeros(num_requests)
    else:
        arrival = np.cumsum(rng.exponential(1.0 / request_rate, num_requests))
    return [Request(int(p), int(o), float(t)) for p, o, t in zip(prompt, output, arrival)]
