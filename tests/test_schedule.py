"""Learning-rate schedules: warmup end, stable plateau, decay end values and shapes."""

from __future__ import annotations

import math

import pytest
from omegaconf import OmegaConf

from moa_train.schedule import cosine, lr_multiplier, warmup_steps, wsd


def test_warmup_is_linear_and_reaches_peak_on_its_last_step():
    values = [cosine(s, 100, 10, 0.1) for s in range(10)]
    assert values[0] == pytest.approx(0.1)
    assert values[-1] == pytest.approx(1.0)
    assert all(b > a for a, b in zip(values, values[1:]))


def test_cosine_decays_monotonically_to_min_at_last_step():
    values = [cosine(s, 100, 10, 0.1) for s in range(10, 100)]
    assert values[0] == pytest.approx(1.0)
    assert values[-1] == pytest.approx(0.1)
    assert all(b <= a for a, b in zip(values, values[1:]))
    midpoint = 10 + (100 - 1 - 10) / 2
    assert cosine(int(midpoint), 100, 10, 0.1) == pytest.approx(0.55, abs=0.02)


def test_wsd_plateau_then_decay_to_min():
    total, warmup = 100, 5
    values = [wsd(s, total, warmup, 0.0, decay_frac=0.2) for s in range(total)]
    assert values[4] == pytest.approx(1.0)
    assert all(v == 1.0 for v in values[5:80])  # stable phase
    assert values[80] < 1.0
    assert values[-1] == pytest.approx(0.0)
    assert all(b <= a for a, b in zip(values[80:], values[81:]))


@pytest.mark.parametrize("shape, expected_mid", [("linear", 0.5), ("sqrt", 1 - math.sqrt(0.5)),
                                                 ("cosine", 0.5)])
def test_wsd_decay_shapes(shape, expected_mid):
    # decay over the last 10 of 100 steps; step 94 is 5/10 of the way through the decay
    value = wsd(94, 100, 0, 0.0, decay_frac=0.1, decay_shape=shape)
    assert value == pytest.approx(expected_mid)
    assert wsd(99, 100, 0, 0.2, decay_frac=0.1, decay_shape=shape) == pytest.approx(0.2)


def test_sqrt_decays_faster_than_linear_early():
    early = 91
    assert wsd(early, 100, 0, 0, 0.1, "sqrt") < wsd(early, 100, 0, 0, 0.1, "linear")


def test_warmup_steps_explicit_or_fraction():
    assert warmup_steps(1000, None, 0.02) == 20
    assert warmup_steps(1000, 7, 0.02) == 7
    assert warmup_steps(5, 50, 0.0) == 5


def test_lr_multiplier_reads_the_config():
    cfg = OmegaConf.create({"name": "wsd", "warmup_steps": 2, "warmup_frac": 0.0, "min_lr_ratio": 0.0,
                            "decay_frac": 0.5, "decay_shape": "linear"})
    assert lr_multiplier(cfg, 0, 10) == pytest.approx(0.5)
    assert lr_multiplier(cfg, 3, 10) == 1.0
    assert lr_multiplier(cfg, 9, 10) == 0.0
