"""Per-partner differential privacy: per-sample clipping, distributed Gaussian noise, accounting."""

from raysys.privacy.dp import (
    DPClipper,
    DPPlan,
    PartnerAccountant,
    add_noise,
    noise_generator,
    noise_seed,
    noise_std,
    partner_sample_rate,
    plan_dp,
    resolve_noise_multiplier,
    steps_within_budget,
)

__all__ = [
    "DPClipper",
    "DPPlan",
    "PartnerAccountant",
    "add_noise",
    "noise_generator",
    "noise_seed",
    "noise_std",
    "partner_sample_rate",
    "plan_dp",
    "resolve_noise_multiplier",
    "steps_within_budget",
]
