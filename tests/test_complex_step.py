"""fastcurv.complex_step: every rule against double backward, conventions at kinks, errors, metadata.

The oracle is autograd's double backward (``fastcurv.hvp.hvp(method="double-backward")``), itself checked
against dense Hessians in tests/test_hvp.py. float64, tiny models.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fastcurv
from fastcurv import complex_step as cs
from fastcurv.hvp import hvp

D = torch.float64


def flat(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    a_, b_ = flat(a), flat(b)
    return float((a_ - b_).norm() / b_.norm())


def rand_like_params(model: nn.Module) -> list[torch.Tensor]:
    return [torch.randn_like(p) for p in model.parameters() if p.requires_grad]


def three_way(model: nn.Module, loss_fn, batch, seed: int = 0) -> tuple[list, list, list]:
    """(double backward, complex step dual, complex step exact) for one random direction."""
    v = rand_like_params(model)
    out = []
    for kw in ({"method": "double-backward"}, {}, {"exact": True}):
        torch.manual_seed(seed)  # same dropout mask for every method
        out.append(hvp(model, loss_fn, batch, v, **kw))
    return out[0], out[1], out[2]


# --------------------------------------------------------------------------------------------------------
# op zoo: each rule, in models that use parameters everywhere, vs double backward
# --------------------------------------------------------------------------------------------------------
class Arith(nn.Module):
    """matmul/@/.T, add/sub/neg/mul/div (and reflected forms), square, exp, views, cat/stack, getitem, sum/mean."""

    def __init__(self) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(4, 5, dtype=D) / 2)
        self.b = nn.Parameter(torch.randn(4, dtype=D))
        self.s = nn.Parameter(torch.randn(4, dtype=D))
        self.head = nn.Linear(6, 3, dtype=D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x @ self.W.T + self.b
        h = h * self.s - 0.5 * h / (1.5 + h.square()) + torch.rsub(h, 1.0, alpha=0.3)
        h = 2.0 - h.div(torch.tensor(1.7, dtype=D)) + torch.add(h, self.s, alpha=0.5)
        h = (-h).reshape(-1, 2, 2).permute(0, 2, 1).transpose(1, 2).contiguous().view(-1, 4)
        h = torch.cat([h, h[:, :2].clone()], dim=1)
        h = torch.stack([h, h.mul(0.1).exp()], 0).sum(0)
        h = h.unsqueeze(1).expand(-1, 2, -1).mean(1).flatten(1)
        h = torch.matmul(h, self.head.weight.mT) + self.head.bias
        return torch.mm(h, torch.eye(3, dtype=D)) + 1.0 / (2.0 + h.mean(0, keepdim=True).square())


class Nonlinear(nn.Module):
    """abs, maximum/minimum, max/min(dim), amax, clamp, sqrt, log, pow, rsqrt, softmax, where, masked_fill."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(5, 6, dtype=D)
        self.l2 = nn.Linear(6, 6, dtype=D)
        self.head = nn.Linear(6, 3, dtype=D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.l1(x), self.l2(torch.tanh(self.l1(x)))
        h = torch.maximum(a, b) + torch.minimum(a, 0.5 * b) + a.abs() * 0.3
        h = h + torch.max(a, b) + a.max(dim=1, keepdim=True).values + torch.min(b, 1)[0].unsqueeze(1)
        h = h + b.amax(1, keepdim=True) + a.amin(dim=0) + torch.max(b) * 0.1
        h = h + a.clamp(-0.5, 0.7) + torch.clamp_min(b, -0.2) + b.clip(max=0.4)
        h = h + torch.sqrt(a * a + 1.0) + torch.log(1.0 + b.exp()) + (a * 0.5).pow(3) + torch.rsqrt(b.square() + 2.0)
        h = h + F.softmax(a, dim=1) + torch.log_softmax(b, 1) + a.softmax(-1)
        h = torch.where(a > 0, h, 0.5 * b) + h.masked_fill(b < -1, 0.25)
        return self.head(torch.sigmoid(h))


class ConvNorm1d(nn.Module):
    """conv1d, pad, avg/adaptive/max pool1d, layer_norm, rms_norm, chunk/split, in-place +=, relu_, mul_."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, dtype=D)
        self.ln = nn.LayerNorm(8, dtype=D)
        self.rms = nn.RMSNorm(4, dtype=D)
        self.head = nn.Linear(8, 3, dtype=D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (N, 2, 10)
        h = self.conv(F.pad(x, (1, 1)))  # (N, 4, 10)
        h = F.max_pool1d(h, 2) + F.avg_pool1d(h, 2) + F.adaptive_avg_pool1d(h, 5)  # (N, 4, 5)
        h = self.rms(h.transpose(1, 2)).transpose(1, 2)
        p, q = h.chunk(2, dim=1)
        r, s = torch.split(h, [1, 3], dim=1)
        h = torch.cat([p * q, r + s[:, :1]], 1)  # (N, 3, 5)
        h += torch.tanh(s[:, :1])
        h.mul_(1.5)
        h = F.relu(h, inplace=True)
        h = self.ln(F.gelu(h.flatten(1)[:, :8]))
        return self.head(h)


class ConvNorm2d(nn.Module):
    """conv2d, BatchNorm2d, in-place ReLU, max_pool2d (with indices), avg pools, dropout, leaky_relu."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, dtype=D)
        self.bn = nn.BatchNorm2d(3, dtype=D)
        self.conv2 = nn.Conv2d(3, 3, 2, dtype=D)
        self.drop = nn.Dropout(0.25)
        self.head = nn.Linear(12, 3, dtype=D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 2, 6, 6)
        h = F.relu(self.bn(self.conv(x)), inplace=True)
        h, _ = F.max_pool2d(h, 2, return_indices=True)  # (N, 3, 3, 3)
        h = F.leaky_relu(self.conv2(h), 0.2) + F.avg_pool2d(h, 2, stride=1)  # (N, 3, 2, 2)
        h = h + F.adaptive_avg_pool2d(h, 1)
        return self.head(self.drop(h.flatten(1)))


ZOO = {"arith": Arith, "nonlinear": Nonlinear, "convnorm1d": ConvNorm1d, "convnorm2d": ConvNorm2d}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", list(ZOO))
def test_op_rules_match_double_backward(name: str, train: bool) -> None:
    torch.manual_seed(1)
    model = ZOO[name]().train(train)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
    shape = {"convnorm2d": (6, 2, 6, 6), "convnorm1d": (6, 2, 10)}.get(name, (6, 5))
    x = torch.randn(*shape, dtype=D)
    y = torch.randint(0, 3, (6,))
    ref, dual, exact = three_way(model, F.cross_entropy, (x, y))
    assert flat(ref).norm() > 1e-3
    assert rel(dual, ref) <= 1e-12
    assert rel(exact, ref) <= 1e-12


def test_ties_and_kinks_follow_autograd() -> None:
    """Exact ties/zeros on the real plane with nonzero tangents: relu'(0)=0, abs'(0)=0, halves at
    maximum/minimum ties, even sharing at max ties, clamp at its bounds — all as double backward."""
    torch.manual_seed(2)

    class Kinks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Parameter(torch.tensor([0.0, 2.0, -1.0, 1.0, 0.5, 2.0], dtype=D))
            self.b = nn.Parameter(torch.tensor([0.0, 2.0, 0.3, 1.0, -2.0, 2.0], dtype=D))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a, b = self.a * x, self.b * x  # x = 1: ties a == b at 0, 1, 3, 5; max(b) at 1 and 5
            h = torch.relu(a) + a.abs() + torch.maximum(a, b) + torch.minimum(a, b) + a.clamp(0.0, 1.0)
            h = h + torch.max(b) + b.amax(1, keepdim=True) + F.leaky_relu(b - 1.0, 0.1)
            return (h * h * torch.arange(1, 7, dtype=D)).sum(-1, keepdim=True)

    model = Kinks()
    x = torch.ones(1, 6, dtype=D)
    ref, dual, exact = three_way(model, lambda o, t: (o * o).sum() + o.sum() ** 3, (x, None))
    assert rel(dual, ref) <= 1e-12 and rel(exact, ref) <= 1e-12


def test_relu_at_exactly_zero_matches_double_backward() -> None:
    """First-layer bias 0 and half the inputs 0: pre-activations are exactly 0 with nonzero tangents
    (from the bias direction). relu'(0)=0 must match double backward (relu'(0)=1 would be ~16% off)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6, dtype=D), nn.ReLU(), nn.Linear(6, 3, dtype=D))
    with torch.no_grad():
        model[0].bias.zero_()
    x = torch.randn(16, 4, dtype=D)
    x[::2] = 0.0
    y = torch.randint(0, 3, (16,))
    pre = model[0](x)
    assert (pre == 0).sum() >= 6 * 8  # the kink is hit
    v = rand_like_params(model)
    ref = hvp(model, F.cross_entropy, (x, y), v, method="double-backward")
    got = hvp(model, F.cross_entropy, (x, y), v)
    assert rel(got, ref) <= 1e-12
    # the tangent at the kink is nonzero, so relu'(0) = 1 would change the answer
    out = cs.functional_forward(model[0], {"bias": v[1]}, (x,))
    assert (out.im[pre == 0] != 0).any()


# --------------------------------------------------------------------------------------------------------
# exact complex arithmetic vs torch complex128; dual vs exact
# --------------------------------------------------------------------------------------------------------
def test_exact_option_is_the_true_complex_step() -> None:
    """At h=1e-3 the exact option equals a torch complex128 complex step (O(h^2) off Hv); dual is exact."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 5, dtype=D), nn.Tanh(), nn.Linear(5, 2, dtype=D))
    x, t = torch.randn(8, 3, dtype=D), torch.randn(8, 2, dtype=D)
    v = rand_like_params(model)
    h = 1e-3
    w1, b1, w2, b2 = list(model.parameters())
    z = [torch.complex(p, h * vi) for p, vi in zip((w1, b1, w2, b2), v)]
    out = torch.tanh(x.to(torch.complex128) @ z[0].T + z[1]) @ z[2].T + z[3]
    loss = ((out - t) * (out - t)).mean()  # analytic: no abs/conj
    torch_cs = [g / h for g in torch.autograd.grad(loss.imag, [w1, b1, w2, b2])]
    exact = hvp(model, F.mse_loss, (x, t), v, h=h, exact=True)
    dual = hvp(model, F.mse_loss, (x, t), v, h=h)
    ref = hvp(model, F.mse_loss, (x, t), v, method="double-backward")
    assert rel(exact, torch_cs) <= 1e-12
    assert 1e-9 < rel(exact, ref) < 1e-4  # the O(h^2) truncation is really there
    assert rel(dual, ref) <= 1e-12


def test_exact_conv_keeps_the_imaginary_part() -> None:
    """torch's complex conv uses Gauss's 3-mult trick, which zeroes an O(1e-20) imaginary part; the
    exact rule must use four real convolutions."""
    torch.manual_seed(5)
    conv = nn.Conv2d(2, 3, 3, dtype=D)
    x = torch.randn(2, 2, 5, 5, dtype=D)
    v = {"weight": torch.randn(3, 2, 3, 3, dtype=D), "bias": torch.randn(3, dtype=D)}
    h = 1e-20
    with cs.exact_arithmetic():
        out = cs.functional_forward(conv, {k: h * t for k, t in v.items()}, (x,))
    expect = F.conv2d(x, v["weight"], v["bias"])
    assert torch.allclose(out.im / h, expect, rtol=1e-12, atol=1e-12)


def test_real_plane_is_the_ordinary_forward() -> None:
    torch.manual_seed(6)
    model = ConvNorm1d().eval()
    x, y = torch.randn(4, 2, 10, dtype=D), torch.randint(0, 3, (4,))
    tangents = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    out = cs.functional_forward(model, tangents, (x,))
    loss = F.cross_entropy(out, y)
    assert isinstance(out, cs.Planes) and isinstance(loss, cs.Planes)
    torch.testing.assert_close(out.re, model(x), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(loss.re, F.cross_entropy(model(x), y), rtol=1e-14, atol=1e-14)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # inside torch.func.jvp
@given(scale=st.sampled_from([1.0, 30.0, 1000.0]), n=st.integers(1, 9), c=st.integers(2, 7))
def test_log_softmax_and_cross_entropy_planes(scale: float, n: int, c: int) -> None:
    """im of log_softmax = the JVP (torch.func.jvp) at large logit scales (max shift on the real part);
    exact mode equals complex128 arithmetic; no NaN/inf."""
    g = torch.Generator().manual_seed(n * 10 + c)
    a = torch.randn(n, c, dtype=D, generator=g) * scale
    ai = torch.randn(n, c, dtype=D, generator=g)
    t = torch.randint(0, c, (n,), generator=g)
    p = cs.planes(a, ai)
    ls = F.log_softmax(p, dim=1)
    _, jv = torch.func.jvp(lambda z: F.log_softmax(z, 1), (a,), (ai,))
    torch.testing.assert_close(ls.im, jv, rtol=1e-12, atol=1e-12 * scale)
    ce = F.cross_entropy(p, t)
    _, jce = torch.func.jvp(lambda z: F.cross_entropy(z, t), (a,), (ai,))
    torch.testing.assert_close(ce.im, jce, rtol=1e-12, atol=1e-12 * scale)
    with cs.exact_arithmetic():
        h = 1e-20
        ex = F.log_softmax(cs.planes(a, h * ai), 1)
    assert torch.isfinite(ex.re).all() and torch.isfinite(ex.im).all()
    torch.testing.assert_close(ex.im / h, jv, rtol=1e-12, atol=1e-12 * scale)


# --------------------------------------------------------------------------------------------------------
# linear goes through fastcurv.ops.complex_linear; dual by default
# --------------------------------------------------------------------------------------------------------
def test_linear_uses_complex_linear_op(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = fastcurv.ops.complex_linear

    def spy(*args, **kwargs):
        calls.append(kwargs["dual"])
        return real(*args, **kwargs)

    monkeypatch.setattr(fastcurv.ops, "complex_linear", spy)
    model = nn.Sequential(nn.Linear(3, 4, dtype=D), nn.Tanh(), nn.Linear(4, 2, dtype=D))
    x, y = torch.randn(5, 3, dtype=D), torch.randint(0, 2, (5,))
    v = rand_like_params(model)
    hvp(model, F.cross_entropy, (x, y), v)
    assert calls == [True, True]
    hvp(model, F.cross_entropy, (x, y), v, exact=True)
    assert calls[2:] == [False, False]


def test_backends_agree(backend: str) -> None:
    """The complex-step HVP through both backends of complex_linear (Triton runs in the interpreter on CPU)."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x, y = torch.randn(9, 5), torch.randint(0, 3, (9,))
    v = rand_like_params(model)
    ref = hvp(model.double(), F.cross_entropy, (x.double(), y), [t.double() for t in v], method="double-backward")
    model.float()
    got = hvp(model, F.cross_entropy, (x, y), v)
    assert rel([g.double() for g in got], ref) <= 1e-5


# --------------------------------------------------------------------------------------------------------
# errors: unsupported ops and options never give a silently wrong product
# --------------------------------------------------------------------------------------------------------
class Erf(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2, dtype=D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).erf()


def _cs_on(model: nn.Module, loss_fn, x, y) -> None:
    hvp(model, loss_fn, (x, y), rand_like_params(model))


def test_unsupported_op_raises_naming_it() -> None:
    x, y = torch.randn(4, 3, dtype=D), torch.randint(0, 2, (4,))
    with pytest.raises(NotImplementedError, match=r"no complex-step rule for torch\.Tensor\.erf"):
        _cs_on(Erf(), F.cross_entropy, x, y)
    elu = nn.Sequential(nn.Linear(3, 2, dtype=D), nn.ELU())
    with pytest.raises(NotImplementedError, match=r"no complex-step rule for torch\.nn\.functional\.elu"):
        _cs_on(elu, F.cross_entropy, x, y)
    # double backward handles it
    v = rand_like_params(elu)
    assert flat(hvp(elu, F.cross_entropy, (x, y), v, method="double-backward")).isfinite().all()


@pytest.mark.parametrize(
    "loss_fn, target, match",
    [
        (lambda o, t: F.cross_entropy(o, t, label_smoothing=0.1), "int", "label_smoothing"),
        (F.cross_entropy, "prob", "probability"),
        (lambda o, t: F.binary_cross_entropy_with_logits(o, t, pos_weight=torch.ones(2, dtype=D)), "prob", "pos_weight"),
        (lambda o, t: F.mse_loss(o, t, weight=torch.ones(2, dtype=D)), "prob", "weight"),
        (lambda o, t: torch.div(o, 3.0, rounding_mode="floor").sum(), "int", "rounding_mode"),
        (lambda o, t: torch.pow(o, torch.tensor(2.0, dtype=D)).sum(), "int", "pow"),
        (lambda o, t: (o @ o.T).sum() + torch.erfinv(o * 0.1).sum(), "int", "erfinv"),
        (lambda o, t: o.sum() + (o.data.sum()), "int", "data"),
    ],
)
def test_unsupported_options_raise(loss_fn, target: str, match: str) -> None:
    torch.manual_seed(8)
    model = nn.Linear(3, 2, dtype=D)
    x = torch.randn(4, 3, dtype=D)
    y = torch.randint(0, 2, (4,)) if target == "int" else torch.rand(4, 2, dtype=D).softmax(1)
    with pytest.raises(NotImplementedError, match=match):
        _cs_on(model, loss_fn, x, y)


def test_inplace_semantics() -> None:
    a, ai = torch.randn(3, dtype=D), torch.randn(3, dtype=D)
    p = cs.planes(a, ai)
    q = p
    q += 2.0 * p  # rebinding on the same object
    assert q is p
    torch.testing.assert_close(p.re, 3 * a)
    torch.testing.assert_close(p.im, 3 * ai)
    p.mul_(torch.tensor([1.0, 2.0, 3.0], dtype=D))
    torch.testing.assert_close(p.im, 3 * ai * torch.tensor([1.0, 2.0, 3.0], dtype=D))
    plain = torch.zeros(3, dtype=D)
    with pytest.raises(NotImplementedError, match="in-place"):
        plain.add_(p)
    with pytest.raises(NotImplementedError, match="__setitem__"):
        p[0] = 1.0


def test_metadata_and_zero_tangent_results() -> None:
    a = torch.randn(2, 3, dtype=D, requires_grad=True)
    p = cs.planes(a, torch.randn(2, 3, dtype=D))
    assert p.shape == (2, 3) and p.dtype == D and p.device == a.device and p.dim() == 2 and len(p) == 2
    assert p.size(-1) == 3 and p.numel() == 6 and p.requires_grad and p.is_floating_point()
    assert "Planes(re=" in repr(p)
    for t, shape in ((p.T, (3, 2)), (p.mT, (3, 2)), (p.H, (3, 2))):
        assert isinstance(t, cs.Planes) and t.shape == shape
        torch.testing.assert_close(t.im, p.im.T)
    gt = p > 0
    assert type(gt) is torch.Tensor and torch.equal(gt, a > 0)
    d = p.detach()
    assert type(d) is torch.Tensor and torch.equal(d, a.detach())
    assert type(torch.zeros_like(p)) is torch.Tensor and type(p.argmax()) is torch.Tensor
    assert float(p.sum().detach()) == pytest.approx(float(a.sum().detach()))
    assert cs.split(3.0) == (3.0, None) and cs.planes(a, None) is a
    assert "torch.tanh" in cs.supported_ops() and "torch.nn.functional.linear" in cs.supported_ops()


def test_batchnorm_train_advances_running_stats_once() -> None:
    torch.manual_seed(9)
    bn = nn.BatchNorm1d(4, dtype=D)
    twin = nn.BatchNorm1d(4, dtype=D)
    x = torch.randn(8, 4, dtype=D)
    cs.functional_forward(bn, {"weight": torch.randn(4, dtype=D)}, (x,))
    twin(x)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(bn, name), getattr(twin, name))


def test_train_dropout_one_mask_for_both_planes() -> None:
    a, ai = torch.randn(50, dtype=D), torch.randn(50, dtype=D)
    torch.manual_seed(10)
    out = F.dropout(cs.planes(a, ai), 0.4, True)
    torch.manual_seed(10)
    ref = F.dropout(a, 0.4, True)
    torch.testing.assert_close(out.re, ref)
    mask = ref / a
    torch.testing.assert_close(out.im, ai * mask)
    assert (ref == 0).any() and (ref != 0).any()
    assert F.dropout(cs.planes(a, ai), 0.4, False).im is ai


def test_float32_small_curvature_default_h() -> None:
    """loss × 1e-12 in float32: default h = 1 keeps full accuracy; h = 1e-30 underflows (why it is not the default)."""
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    v = rand_like_params(model)
    loss = lambda o, t: 1e-12 * F.cross_entropy(o, t)  # noqa: E731
    ref = hvp(model.double(), loss, (x.double(), y), [t.double() for t in v], method="double-backward")
    model.float()
    got = hvp(model, loss, (x, y), v)
    assert rel([g.double() for g in got], ref) <= 1e-5
    tiny = hvp(model, loss, (x, y), v, h=1e-30)
    assert rel([g.double() for g in tiny], ref) > 1e-2


def test_dual_is_linear_in_h() -> None:
    """In dual arithmetic the imaginary plane is exactly h · JVP: h is a pure scale (powers of two: bitwise)."""
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(4, 5, dtype=D), nn.GELU(), nn.LayerNorm(5, dtype=D), nn.Linear(5, 2, dtype=D))
    x = torch.randn(3, 4, dtype=D)
    v = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    base = cs.functional_forward(model, v, (x,))
    for k in (-60, -3, 5):
        out = cs.functional_forward(model, {n: t * 2.0**k for n, t in v.items()}, (x,))
        assert torch.equal(out.im, base.im * 2.0**k)
        assert torch.equal(out.re, base.re)
    assert math.isfinite(float(base.im.detach().abs().max()))
