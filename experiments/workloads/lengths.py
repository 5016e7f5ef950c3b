"""Reference output lengths for workloads without reference outputs.

Stand-ins and generators have no reference answers, so their ``output_len`` is drawn
from a seeded lognormal whose MEAN matches a published figure for the matching real
dataset. Only means are cited; the shapes (``sigma``) are our assumptions, chosen by
eye to give the spread of the published histograms, and are flagged as such in the
README and in each ``.meta.json``. Published figures were counted with other
tokenizers (OPT for vLLM, the authors' word tokenisation for See et al.), so they are
approximate in any other tokenizer.

* ``cnn_dailymail``: mean 56 tokens per reference summary (3.75 sentences), articles
  781 tokens on average -- See, Liu & Manning, "Get To The Point: Summarization with
  Pointer-Generator Networks", ACL 2017, section 4 (dataset).
* ``alpaca``: mean output 58.45 tokens (input 19.31) -- Kwon et al., "Efficient Memory
  Management for Large Language Model Serving with PagedAttention" (vLLM), SOSP 2023,
  Fig. 11 (length distributions of the Alpaca dataset, OPT tokenizer).
* ``sharegpt``: mean output 337.99 tokens (input 161.31) -- same paper, Fig. 11
  (ShareGPT). These are first-turn figures; we use them per turn.
* ``dolly``: we know of no published token-length figure we can cite with
  confidence, so Dolly-QA stand-ins use the Alpaca figure as a PROXY (both are short
  instruction-following answers). Flagged ``proxy`` in meta.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from .format import WorkloadError


@dataclass(frozen=True)
class LengthDist:
    """A lognormal length distribution with a given mean, clipped to [lo, hi]."""

    name: str
    mean: float
    sigma: float
    lo: int
    hi: int
    source: str
    sigma_source: str = "assumption (shape chosen by eye; only the mean is published)"
    proxy_for: str | None = None

    @property
    def mu(self) -> float:
        return math.log(self.mean) - self.sigma ** 2 / 2

    def sample(self, rng: np.random.Generator, n: int) -> list[int]:
        x = rng.lognormal(self.mu, self.sigma, size=n)
        return [int(v) for v in np.clip(np.rint(x), self.lo, self.hi)]

    def describe(self) -> dict:
        d = asdict(self)
        d["mu"] = round(self.mu, 6)
        d["distribution"] = "lognormal(mu, sigma), rounded, clipped to [lo, hi]"
        return d


_VLLM = ("Kwon et al., SOSP 2023 (vLLM / PagedAttention), Fig. 11: mean lengths "
         "in OPT tokens")
DISTRIBUTIONS = {
    "cnn_dailymail": LengthDist(
        "cnn_dailymail", 56.0, 0.35, 8, 256,
        "See, Liu & Manning, ACL 2017, sec. 4: CNN/DailyMail reference summaries average "
        "56 tokens (3.75 sentences); articles 781 tokens"),
    "alpaca": LengthDist("alpaca", 58.45, 0.9, 1, 1024, _VLLM + " (Alpaca output 58.45)"),
    "sharegpt": LengthDist("sharegpt", 337.99, 1.0, 4, 2048, _VLLM + " (ShareGPT output 337.99)"),
    "dolly": LengthDist("dolly", 58.45, 0.9, 1, 1024,
                        _VLLM + " (Alpaca output 58.45) used as a proxy: no Dolly figure we can cite",
                        proxy_for="databricks-dolly-15k"),
}


def get_distribution(name: str) -> LengthDist:
    try:
        return DISTRIBUTIONS[name]
    except KeyError:
        raise WorkloadError(f"unknown output-length distribution {name!r}; "
                            f"choose one of {', '.join(DISTRIBUTIONS)}") from None
