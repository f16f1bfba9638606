"""Token counts drawn from a length distribution: the one sampler behind the simulated
backend's output lengths, the load test's prompts and `max_tokens`, and the economics
simulator's traffic plan."""

from __future__ import annotations

import math
import random
from typing import Literal

#: The distributions a length can be drawn from.
Distribution = Literal["lognormal", "normal", "uniform", "fixed"]


def draw_length(
    rng: random.Random,
    distribution: Distribution,
    mean: float | None,
    sd: float,
    low: int,
    high: int,
) -> int:
    """One length, rounded to a whole count and clamped to `[low, high]`.

    lognormal and normal have mean `mean` and standard deviation `sd`; uniform spans
    `mean ± √3·sd` (the same mean and deviation), or `[low, high]` without a mean; fixed,
    or an `sd` of 0, is `mean`. Only uniform may go without a mean.
    """
    if mean is None:
        value = rng.uniform(low, high)
    elif distribution == "fixed" or sd == 0:
        value = mean
    elif distribution == "normal":
        value = rng.gauss(mean, sd)
    elif distribution == "uniform":
        half_width = math.sqrt(3) * sd
        value = rng.uniform(mean - half_width, mean + half_width)
    else:
        sigma2 = math.log1p((sd / mean) ** 2)
        value = rng.lognormvariate(math.log(mean) - sigma2 / 2, math.sqrt(sigma2))
    return min(max(round(value), low), high)
