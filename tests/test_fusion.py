"""Local SGD's arithmetic, in one process: the anchors the live tests then hold the job to."""

from __future__ import annotations

import pytest
import torch

from raysys.data.demo import write_blobs_table
from raysys.data.sources import load_partner_table
from raysys.spec import AggregationSpec
from raysys.train.fusion import FusionConfig, round_end
from raysys.train.reference import (
    max_relative_difference,
    reference_local_sgd,
    reference_parameters,
)
from raysys.train.replica import ReplicaConfig


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    d = tmp_path_factory.mktemp("fusion")
    paths = {"alpha": write_blobs_table(d / "a.parquet", 150, 12, 4, seed=1),
             "beta": write_blobs_table(d / "b.parquet", 90, 12, 4, seed=2)}
    return {p: load_partner_table(p, path, None, "label") for p, path in paths.items()}


def config(momentum: float = 0.0, fusion: FusionConfig | None = None) -> ReplicaConfig:
    return ReplicaConfig("mlp", {"hidden": [32]}, 12, 4, 7, "sgd", 0.05, momentum, 1e-4,
                         fusion=fusion)


def test_one_local_step_with_plain_averaging_is_allreduce_sgd(tables):
    fused = reference_local_sgd(config(fusion=FusionConfig(1)), tables, 7, 30, 40)
    plain = reference_parameters(config(), tables, 7, 30, 40)
    assert max_relative_difference(fused.flat_parameters().numpy(), plain) <= 1e-5


def test_one_local_step_with_server_momentum_is_momentum_sgd(tables):
    # FedAvgM with H = 1: v = beta v + Delta, w += v, Delta = -lr g: torch's SGD momentum.
    fusion = FusionConfig(1, server_optimizer="fedavgm", server_momentum=0.9)
    fused = reference_local_sgd(config(fusion=fusion), tables, 7, 30, 40)
    plain = reference_parameters(config(momentum=0.9), tables, 7, 30, 40)
    assert max_relative_difference(fused.flat_parameters().numpy(), plain) <= 1e-5


def test_longer_rounds_differ_from_allreduce(tables):
    # The anchor above would pass trivially if fusion ignored local_steps.
    fused = reference_local_sgd(config(fusion=FusionConfig(5)), tables, 7, 30, 40)
    plain = reference_parameters(config(), tables, 7, 30, 40)
    assert max_relative_difference(fused.flat_parameters().numpy(), plain) > 1e-3


def test_fusion_weights_partners_by_samples(tables):
    # After one round of local steps, w = w0 + sum_p n_p (w_p - w0) / sum_p n_p exactly.
    from raysys.train.replica import Replica

    cfg = config(fusion=FusionConfig(3))
    w0 = Replica(cfg).flat_parameters()
    fused = reference_local_sgd(cfg, tables, 7, 30, 3).flat_parameters()
    # The partners' batches are 19 and 11 (of 30, by rows 150:90) for 3 steps each.
    batch = {"alpha": 19, "beta": 11}
    alone = {p: reference_local_sgd(cfg, {p: t}, 7, batch[p], 3).flat_parameters()
             for p, t in tables.items()}
    expected = w0 + (19 * (alone["alpha"] - w0) + 11 * (alone["beta"] - w0)) / 30
    assert torch.allclose(fused, expected, atol=1e-6)


def test_fedprox_pulls_towards_the_global_model(tables):
    free = reference_local_sgd(config(fusion=FusionConfig(10)), tables, 7, 30, 9)
    prox = reference_local_sgd(config(fusion=FusionConfig(10, proximal_mu=5.0)), tables, 7, 30, 9)
    from raysys.train.replica import Replica

    w0 = Replica(config()).flat_parameters()
    # 9 steps, no fusion yet (the round ends at 10): each replica still holds its local model.
    assert (prox.flat_parameters() - w0).norm() < 0.8 * (free.flat_parameters() - w0).norm()


def test_fedadam_moves_every_coordinate_by_about_the_server_lr(tables):
    from raysys.train.replica import Replica

    fusion = FusionConfig(2, server_optimizer="fedadam", server_lr=0.01, server_tau=1e-6)
    w0 = Replica(config()).flat_parameters()
    w1 = reference_local_sgd(config(fusion=fusion), tables, 7, 30, 2).flat_parameters()
    # First step: m = 0.1 d, v = 0.01 d^2, so |step| = lr * 0.1|d| / (0.1|d| + tau) ~ lr.
    moved = (w1 - w0).abs()
    assert float(moved.max()) <= 0.01 + 1e-6
    assert float(moved.median()) > 0.009


def test_rounds_end_on_multiples_and_at_the_end_of_a_call():
    cfg = FusionConfig(5)
    assert [s for s in range(12) if cfg.ends_round(s, 11)] == [4, 9, 11]
    assert round_end(0, 5) == 5 and round_end(4, 5) == 5 and round_end(5, 5) == 10


def test_aggregation_fields_of_local_sgd_are_refused_under_allreduce():
    with pytest.raises(ValueError, match="local_steps only apply with mode: local_sgd"):
        AggregationSpec(mode="allreduce", local_steps=3)
    assert AggregationSpec(mode="local_sgd", server_optimizer="fedadam").resolved_server_lr \
        == 0.01
    with pytest.raises(ValueError, match="betas"):
        AggregationSpec(mode="local_sgd", server_betas=(0.9, 1.0))
