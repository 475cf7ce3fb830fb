"""fastcurv.losses: kinds and reductions, H_l u and per-sample output Hessians against dense float64 autograd
Hessians (recognised torch losses with every option, probability targets, a user-written loss), the
likelihood conventions and target sampling from a non-finite output."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastcurv import losses

D = torch.float64


def _my_loss(out, t):
    return F.binary_cross_entropy_with_logits(out, t, reduction="none").sum(1).mean()


def _case(name: str):
    g = torch.Generator().manual_seed(5)
    z = torch.randn(6, 4, generator=g, dtype=D) * 2
    cls = torch.randint(0, 4, (6,), generator=g)
    prob = torch.rand(6, 4, generator=g, dtype=D)
    fns = {
        "ce": (F.cross_entropy, cls),
        "ce-sum-ignore": (nn.CrossEntropyLoss(reduction="sum", ignore_index=2), cls),
        "ce-soft": (F.cross_entropy, torch.softmax(prob * 3, 1)),
        "ce-smoothing": (nn.CrossEntropyLoss(label_smoothing=0.1), cls),
        "ce-weight": (nn.CrossEntropyLoss(weight=torch.rand(4, generator=g, dtype=D) + 0.5), cls),
        "bce": (F.binary_cross_entropy_with_logits, prob),
        "bce-pos-weight": (nn.BCEWithLogitsLoss(pos_weight=torch.rand(4, generator=g, dtype=D) + 0.5), prob),
        "mse-sum": (nn.MSELoss(reduction="sum"), prob),
        "user-written": (_my_loss, prob),
    }
    fn, t = fns[name]
    return fn, z, t


NAMES = ["ce", "ce-sum-ignore", "ce-soft", "ce-smoothing", "ce-weight", "bce", "bce-pos-weight", "mse-sum", "user-written"]


def _dense(fn, z, t) -> torch.Tensor:
    return torch.autograd.functional.hessian(lambda o: fn(o, t), z)  # (N, K, N, K)


@pytest.mark.parametrize("name", NAMES)
def test_hessian_vp_is_the_dense_hessian(name: str) -> None:
    fn, z, t = _case(name)
    u = torch.randn(z.shape, generator=torch.Generator().manual_seed(6), dtype=D)
    Hd = _dense(fn, z, t).reshape(z.numel(), z.numel())
    torch.testing.assert_close(losses.hessian_vp(fn, z, t, u).reshape(-1), Hd @ u.reshape(-1), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", NAMES)
def test_per_sample_output_hessians_are_the_dense_diagonal_blocks(name: str) -> None:
    fn, z, t = _case(name)
    Hd = _dense(fn, z, t)
    n = z.shape[0]
    for i in range(n):  # the losses are separable: the cross-sample blocks vanish
        for j in range(n):
            if i != j:
                assert torch.equal(Hd[i, :, j, :], torch.zeros_like(Hd[i, :, j, :]))
    want = torch.stack([Hd[i, :, i, :] for i in range(n)])
    torch.testing.assert_close(losses.output_hessians(fn, z, t), want, rtol=1e-12, atol=1e-14)


def test_describe() -> None:
    assert losses.describe(F.cross_entropy) == losses.LossInfo("cross_entropy", "mean", False)
    assert losses.describe(nn.MSELoss(reduction="sum")) == losses.LossInfo("mse", "sum", True)
    assert losses.describe(nn.BCEWithLogitsLoss(reduction="none")).reduction == "none"
    assert losses.describe(_my_loss) == losses.LossInfo("custom", None, False)


def test_nll_conventions() -> None:
    z = torch.randn(5, 3, dtype=D)
    t = torch.rand(5, 3, dtype=D)
    c = torch.randint(0, 3, (5,))
    torch.testing.assert_close(losses.nll("bernoulli", z, t), _my_loss(z, t), rtol=1e-15, atol=0)
    torch.testing.assert_close(losses.nll("gaussian", z, t), 0.5 * ((z - t) ** 2).sum(1).mean(), rtol=1e-15, atol=0)
    torch.testing.assert_close(losses.nll("categorical", z, c), F.cross_entropy(z, c), rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match="likelihood"):
        losses.nll("poisson", z, t)


@pytest.mark.parametrize("likelihood", losses.LIKELIHOODS)
def test_sampling_from_a_non_finite_output_does_not_raise_and_stays_non_finite(likelihood: str) -> None:
    z = torch.randn(4, 3, dtype=D)
    z[1, 2] = float("nan")
    z[2, 0] = float("inf")
    g = torch.Generator().manual_seed(0)
    t = losses.sample_targets(likelihood, z, g)
    assert torch.isfinite(t.double()).all()
    assert not torch.isfinite(losses.nll(likelihood, z, t))


def test_reduction_of_a_computed_loss() -> None:
    z = torch.randn(4, 3, dtype=D, requires_grad=True)
    y, t = torch.randint(0, 3, (4,)), torch.rand(4, 3, dtype=D)
    assert losses.reduction_of(F.cross_entropy(z, y, reduction="sum")) == "sum"
    assert losses.reduction_of(nn.CrossEntropyLoss()(z, y)) == "mean"
    assert losses.reduction_of(F.mse_loss(z, t, reduction="sum")) == "sum"
    assert losses.reduction_of(F.binary_cross_entropy_with_logits(z, t)) == "mean"
    assert losses.reduction_of(F.binary_cross_entropy_with_logits(z, t, reduction="sum") / 4) is None
    assert losses.reduction_of(_my_loss(z, t)) is None
    assert losses.reduction_of(torch.tensor(1.0)) is None
