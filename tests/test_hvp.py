"""fastcurv.hvp: the three curvature products against dense Hessians / explicit Jacobians, the API contract
(state untouched, validation), and torch.compile. float64 dense references on tiny nets only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from fastcurv.hvp import METHODS, block_ggn_vp, ggn_vp, grad_and_hvp, hvp, hvp_many, loss_hessian_vp

D = torch.float64


def flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def rel(a, b) -> float:
    a_, b_ = flat(a), flat(b)
    return float((a_ - b_).norm() / b_.norm())


def trainable(model: nn.Module) -> tuple[list[str], list[torch.Tensor]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, _ in named], [p for _, p in named]


def unflat(vec: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    out, i = [], 0
    for p in like:
        out.append(vec[i : i + p.numel()].view_as(p))
        i += p.numel()
    return out


def dense_hessian(model: nn.Module, loss_fn, x, y, seed: int | None = None) -> torch.Tensor:
    """The full Hessian of loss_fn(model(x), y) w.r.t. the trainable parameters (buffers copied, not touched)."""
    names, ps = trainable(model)
    bufs = {n: b.clone() for n, b in model.named_buffers()}

    def f(theta: torch.Tensor) -> torch.Tensor:
        d = dict(zip(names, unflat(theta, ps)))
        d.update({n: b.clone() for n, b in bufs.items()})
        if seed is not None:
            torch.manual_seed(seed)
        return loss_fn(torch.func.functional_call(model, d, (x,)), y)

    return torch.autograd.functional.hessian(f, flat([p.detach() for p in ps]))


def randvec(model: nn.Module) -> list[torch.Tensor]:
    return [torch.randn_like(p) for p in trainable(model)[1]]


# --------------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------------
ACTS = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU("tanh"),
    "silu": nn.SiLU,
    "softplus": nn.Softplus,
}


def targets(loss: str, n: int, c: int, dtype=D) -> torch.Tensor:
    if loss == "ce":
        return torch.randint(0, c, (n,))
    if loss == "bce":
        return torch.rand(n, c, dtype=dtype)
    return torch.randn(n, c, dtype=dtype)


LOSSES = {"ce": F.cross_entropy, "bce": F.binary_cross_entropy_with_logits, "mse": F.mse_loss}


def mlp(act: str, dtype=D) -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), ACTS[act](), nn.Linear(5, 3)).to(dtype)


def cnn(act: str = "relu") -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), ACTS[act](), nn.MaxPool2d(2), nn.Conv2d(2, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)
    ).to(D)


def ln_net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.GELU(), nn.Linear(5, 3)).to(D)


def bn_net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).to(D)


def bn_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)).to(D)


def data(kind: str, loss: str = "ce", n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    if kind in ("cnn", "bn_cnn"):
        x = torch.randn(n, 1, 6 if kind == "cnn" else 4, 6 if kind == "cnn" else 4, dtype=D)
    else:
        x = torch.randn(n, 4, dtype=D)
    return x, targets(loss, n, 3)


def perturb_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)


def check_all_methods(model: nn.Module, loss_fn, x, y, tol: float = 1e-12) -> None:
    H = dense_hessian(model, loss_fn, x, y)
    v = randvec(model)
    ref = H @ flat(v)
    assert ref.norm() > 1e-6
    for kw in ({}, {"method": "double-backward"}, {"exact": True}):
        got = flat(hvp(model, loss_fn, (x, y), v, **kw))
        err = float((got - ref).norm() / ref.norm())
        assert err <= tol, (kw, err)


# --------------------------------------------------------------------------------------------------------
# complex step = double backward = dense Hessian @ v
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("act", list(ACTS))
def test_mlp_each_activation_each_loss(act: str, loss: str) -> None:
    torch.manual_seed(0)
    model = mlp(act)
    x, y = data("mlp", loss)
    check_all_methods(model, LOSSES[loss], x, y)


@pytest.mark.parametrize(
    "kind, train",
    [("cnn", False), ("cnn_tanh", False), ("ln", True), ("bn", False), ("bn", True), ("bn_cnn", False), ("bn_cnn", True)],
)
def test_cnn_layernorm_batchnorm_models(kind: str, train: bool) -> None:
    torch.manual_seed(1)
    model = {"cnn": cnn, "cnn_tanh": lambda: cnn("tanh"), "ln": ln_net, "bn": bn_net, "bn_cnn": bn_cnn}[kind]()
    perturb_bn(model)
    model.train(train)
    x, y = data("cnn" if kind.startswith("cnn") else kind)
    check_all_methods(model, F.cross_entropy, x, y)


def test_dropout_train_same_mask_every_method() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)).to(D).train()
    x, y = data("mlp")
    v = randvec(model)
    H = dense_hessian(model, F.cross_entropy, x, y, seed=7)
    ref = H @ flat(v)
    for kw in ({}, {"method": "double-backward"}, {"exact": True}):
        torch.manual_seed(7)
        assert float((flat(hvp(model, F.cross_entropy, (x, y), v, **kw)) - ref).norm() / ref.norm()) <= 1e-12
    torch.manual_seed(8)  # another mask, another Hessian: the test sees the mask
    assert rel(hvp(model, F.cross_entropy, (x, y), v), unflat(ref, v)) > 1e-3


@pytest.mark.parametrize("act", ["tanh", "relu", "gelu"])
def test_float32_against_float64(act: str) -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 16), ACTS[act](), nn.Linear(16, 16), ACTS[act](), nn.Linear(16, 3))
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    v = randvec(model)
    ref = hvp(model.double(), F.cross_entropy, (x.double(), y), [t.double() for t in v], method="double-backward")
    model.float()
    for kw in ({}, {"method": "double-backward"}):
        got = hvp(model, F.cross_entropy, (x, y), v, **kw)
        assert got[0].dtype == torch.float32
        assert rel([g.double() for g in got], ref) <= 1e-5


def test_h_invariance() -> None:
    """exact complex step: every h in [1e-30, 1e-10] (float64); dual default: any h, same product."""
    torch.manual_seed(4)
    model = ln_net()
    x, y = data("ln")
    v = randvec(model)
    ref = hvp(model, F.cross_entropy, (x, y), v, method="double-backward")
    for h in (1e-30, 1e-25, 1e-20, 1e-15, 1e-10):
        assert rel(hvp(model, F.cross_entropy, (x, y), v, h=h, exact=True), ref) <= 1e-12
    dual = [hvp(model, F.cross_entropy, (x, y), v, h=h) for h in (1e-30, 1e-10, 1.0, 1e3)]
    for d in dual:
        assert rel(d, ref) <= 1e-12
        assert rel(d, dual[2]) <= 1e-13


# --------------------------------------------------------------------------------------------------------
# algebraic properties
# --------------------------------------------------------------------------------------------------------
@given(seed=st.integers(0, 2**16), a=st.floats(-1e3, 1e3), b=st.floats(-1e3, 1e3))
def test_symmetry_and_linearity(seed: int, a: float, b: float) -> None:
    torch.manual_seed(seed)
    model = mlp("silu")
    x, y = data("mlp")
    u, v = randvec(model), randvec(model)
    hu = hvp(model, F.cross_entropy, (x, y), u)
    hv = hvp(model, F.cross_entropy, (x, y), v)
    uhv, vhu = flat(u) @ flat(hv), flat(v) @ flat(hu)
    assert abs(uhv - vhu) <= 1e-12 * (flat(u).norm() * flat(hv).norm())
    w = [a * ui + b * vi for ui, vi in zip(u, v)]
    hw = flat(hvp(model, F.cross_entropy, (x, y), w))
    expect = a * flat(hu) + b * flat(hv)
    scale = abs(a) * flat(hu).norm() + abs(b) * flat(hv).norm()
    assert (hw - expect).norm() <= 1e-12 * scale


@pytest.mark.parametrize("method", METHODS)
def test_grad_and_hvp_returns_the_gradient(method: str) -> None:
    torch.manual_seed(5)
    model = bn_net().train()
    x, y = data("bn")
    v = randvec(model)
    loss, grad, cv = grad_and_hvp(model, F.cross_entropy, (x, y), v, method=method)
    ref_loss = F.cross_entropy(torch.func.functional_call(model, {n: b.clone() for n, b in model.named_buffers()}, (x,)), y)
    ref_grad = torch.autograd.grad(ref_loss, trainable(model)[1])
    assert loss.shape == () and not loss.requires_grad
    assert abs(float(loss - ref_loss.detach())) <= 1e-14
    assert rel(grad, ref_grad) <= 1e-13
    assert rel(cv, hvp(model, F.cross_entropy, (x, y), v, method=method)) <= 1e-14
    assert not any(g.requires_grad for g in grad + cv)


# --------------------------------------------------------------------------------------------------------
# GGN
# --------------------------------------------------------------------------------------------------------
def explicit_ggn(model: nn.Module, loss_fn, x, y) -> torch.Tensor:
    """J^T H_l J from torch.autograd.functional.jacobian / hessian, dense."""
    names, ps = trainable(model)

    def out_of(theta: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, dict(zip(names, unflat(theta, ps))), (x,))

    theta = flat([p.detach() for p in ps])
    out = out_of(theta)
    J = torch.autograd.functional.jacobian(out_of, theta).reshape(out.numel(), -1)
    Hl = torch.autograd.functional.hessian(lambda o: loss_fn(o.view_as(out), y), out.detach().reshape(-1))
    return J.T @ Hl @ J


def smooth_loss(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Not recognised: goes through the generic autograd loss Hessian."""
    return (torch.log(torch.cosh(o - t)) + 0.1 * (o - t) ** 4).mean()


@pytest.mark.parametrize("loss", ["ce", "bce", "mse", "generic", "ce_module_sum"])
def test_ggn_equals_explicit_jacobians(loss: str) -> None:
    torch.manual_seed(6)
    model = mlp("tanh")
    kind = {"generic": "mse", "ce_module_sum": "ce"}.get(loss, loss)
    x, y = data("mlp", kind)
    loss_fn = {"generic": smooth_loss, "ce_module_sum": nn.CrossEntropyLoss(reduction="sum")}.get(loss, LOSSES.get(loss))
    G = explicit_ggn(model, loss_fn, x, y)
    assert torch.linalg.eigvalsh(G).min() >= -1e-12 * G.norm()  # PSD (convex losses)
    v = randvec(model)
    ref = G @ flat(v)
    results = [
        ggn_vp(model, loss_fn, (x, y), v),
        ggn_vp(model, loss_fn, (x, y), v, jvp="forward-ad"),
        hvp(model, loss_fn, (x, y), v, method="ggn"),
        hvp_many(model, loss_fn, (x, y), [v], method="ggn")[0],
    ]
    for r in results:
        assert float((flat(r) - ref).norm() / ref.norm()) <= 1e-12
    # the GGN is not the Hessian here (nonlinear net): the test tells them apart
    assert rel(hvp(model, loss_fn, (x, y), v, method="double-backward"), unflat(ref, v)) > 1e-4
    assert float(flat(v) @ flat(results[0])) >= 0.0


def test_ggn_blocks_are_diagonal_blocks() -> None:
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 2)).to(D)
    x, y = torch.randn(5, 3, dtype=D), torch.randint(0, 2, (5,))
    G = explicit_ggn(model, F.cross_entropy, x, y)
    _, ps = trainable(model)
    offsets = [0]
    for p in ps:
        offsets.append(offsets[-1] + p.numel())
    blocks = [[ps[0], ps[1]], [ps[2], ps[3]], [ps[4], ps[5]]]
    vecs = [[torch.randn_like(p) for p in blk] for blk in blocks]
    shared = block_ggn_vp(model, F.cross_entropy, (x, y), blocks, vecs)
    for b, (blk, v) in enumerate(zip(blocks, vecs)):
        lo, hi = offsets[2 * b], offsets[2 * b + 2]
        ref = G[lo:hi, lo:hi] @ flat(v)
        for got in (ggn_vp(model, F.cross_entropy, (x, y), v, params=blk), shared[b]):
            assert [g.shape for g in got] == [p.shape for p in blk]
            assert float((flat(got) - ref).norm() / ref.norm()) <= 1e-12
        assert torch.linalg.eigvalsh(G[lo:hi, lo:hi]).min() >= -1e-12 * G.norm()


@pytest.mark.parametrize("method", ["complex-step", "double-backward"])
def test_hessian_block_with_params_subset(method: str) -> None:
    torch.manual_seed(8)
    model = mlp("gelu")
    x, y = data("mlp")
    H = dense_hessian(model, F.cross_entropy, x, y)
    _, ps = trainable(model)
    sub = [ps[2], ps[3]]
    lo = ps[0].numel() + ps[1].numel()
    v = [torch.randn_like(p) for p in sub]
    got = hvp(model, F.cross_entropy, (x, y), v, method=method, params=sub)
    ref = H[lo:, lo:] @ flat(v)
    assert float((flat(got) - ref).norm() / ref.norm()) <= 1e-12


@pytest.mark.parametrize(
    "name",
    ["ce", "ce_sum_ignore", "ce_spatial", "ce_1d", "bce", "bce_weight", "mse", "mse_sum"],
)
def test_analytic_loss_hessians_match_autograd(name: str) -> None:
    torch.manual_seed(9)
    o = torch.randn(7, 4, dtype=D) * 3
    u = torch.randn_like(o)
    t = torch.randint(0, 4, (7,))
    if name == "ce":
        fn = F.cross_entropy
    elif name == "ce_sum_ignore":
        fn, t = nn.CrossEntropyLoss(reduction="sum", ignore_index=2), t
    elif name == "ce_spatial":
        o, t = torch.randn(3, 4, 2, 5, dtype=D), torch.randint(0, 4, (3, 2, 5))
        fn, u = nn.CrossEntropyLoss(ignore_index=1), torch.randn(3, 4, 2, 5, dtype=D)
    elif name == "ce_1d":
        o, t, u = o[0], t[0], u[0]
        fn = F.cross_entropy
    elif name.startswith("bce"):
        t = torch.rand(7, 4, dtype=D)
        fn = nn.BCEWithLogitsLoss(weight=torch.rand(4, dtype=D)) if name == "bce_weight" else F.binary_cross_entropy_with_logits
    else:
        t = torch.randn(7, 4, dtype=D)
        fn = nn.MSELoss(reduction="sum") if name == "mse_sum" else F.mse_loss
    got = loss_hessian_vp(fn, o, t, u)
    ref = loss_hessian_vp(lambda a, b: fn(a, b) + 0.0 * a.sum(), o, t, u)  # a lambda: the generic path
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------------------------------------
# batching several vectors
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_hvp_many_matches_single(method: str) -> None:
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Dropout(0.3), nn.Linear(5, 3)).to(D).train()
    x, y = data("mlp")
    sets = [randvec(model) for _ in range(3)]
    torch.manual_seed(3)
    many = hvp_many(model, F.cross_entropy, (x, y), sets, method=method)
    for vs, got in zip(sets, many):
        torch.manual_seed(3)
        assert rel(got, hvp(model, F.cross_entropy, (x, y), vs, method=method)) <= 1e-13
    assert hvp_many(model, F.cross_entropy, (x, y), [], method=method) == []


# --------------------------------------------------------------------------------------------------------
# the model is left exactly as it was
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_state_is_untouched(method: str) -> None:
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Dropout(0.2), nn.Linear(5, 3)).to(D).train()
    x, y = data("bn")
    F.cross_entropy(model(x), y).backward()
    model[4].bias.grad = None  # a mix of set and unset .grad
    before = {n: t.clone() for n, t in model.state_dict().items()}
    grads = {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}
    grad_objs = {n: p.grad for n, p in model.named_parameters()}
    v = randvec(model)
    rng = torch.get_rng_state()
    hvp(model, F.cross_entropy, (x, y), v, method=method)
    grad_and_hvp(model, F.cross_entropy, (x, y), v, method=method)
    hvp_many(model, F.cross_entropy, (x, y), [v, v], method=method)
    assert torch.equal(torch.get_rng_state(), rng)
    for n, t in model.state_dict().items():
        assert torch.equal(t, before[n]), n
    for n, p in model.named_parameters():
        assert p.grad is grad_objs[n]
        assert (p.grad is None) == (grads[n] is None) and (p.grad is None or torch.equal(p.grad, grads[n]))
        assert type(p) is nn.Parameter and p.requires_grad
    # opting out: the train-mode BatchNorm statistics advance once per forward
    hvp(model, F.cross_entropy, (x, y), v, method=method, preserve_state=False)
    assert int(model[1].num_batches_tracked) == int(before["1.num_batches_tracked"]) + 1
    assert not torch.equal(model[1].running_mean, before["1.running_mean"])



@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("method", METHODS)
def test_graphs_that_saved_a_buffer_survive_a_product(method: str, train: bool) -> None:
    """A BatchNorm's running statistics are saved by the graph of the caller's loss (eval mode) and the
    products run on copies: the caller can still backpropagate, and its buffers are the same tensors."""
    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).to(D).train(train)
    x, y = data("bn")
    buffers = {n: b for n, b in model.named_buffers()}
    loss = F.cross_entropy(model(x), y)
    before = {n: b.clone() for n, b in model.named_buffers()}
    hv = hvp(model, F.cross_entropy, (x, y), randvec(model), method=method)
    loss.backward()
    assert all(torch.isfinite(t).all() for t in hv)
    for n, b in model.named_buffers():
        assert b is buffers[n] and torch.equal(b, before[n]), n

def test_frozen_and_unused_parameters() -> None:
    torch.manual_seed(12)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
            self.unused = nn.Linear(2, 2)  # never called: its Hessian rows are zero

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    model = Net().to(D)
    model.net[0].weight.requires_grad_(False)
    x, y = data("mlp")
    v = randvec(model)
    assert len(v) == 5
    outs = [hvp(model, F.cross_entropy, (x, y), v, method=m) for m in METHODS]
    for out in outs:
        assert [o.shape for o in out] == [t.shape for t in v]
        assert flat(out[3:]).abs().max() == 0
    assert rel(outs[0], outs[1]) <= 1e-12


# --------------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------------
def test_validation_errors() -> None:
    torch.manual_seed(13)
    model = mlp("tanh")
    x, y = data("mlp")
    v = randvec(model)
    b = (x, y)
    ce = F.cross_entropy
    with pytest.raises(ValueError, match="vectors has 3 tensors but there are 4 parameters"):
        hvp(model, ce, b, v[:3])
    with pytest.raises(ValueError, match=r"vectors\[1\] has shape \(4,\) but parameter '0.bias' has shape \(5,\)"):
        hvp(model, ce, b, [v[0], torch.zeros(4, dtype=D), v[2], v[3]])
    with pytest.raises(TypeError, match=r"vectors\[0\] has dtype torch.float32"):
        hvp(model, ce, b, [v[0].float()] + v[1:])
    with pytest.raises(TypeError, match="vectors must be a list"):
        hvp(model, ce, b, flat(v))
    with pytest.raises(TypeError, match=r"vectors\[2\] must be a tensor"):
        hvp(model, ce, b, [v[0], v[1], 1.0, v[3]])
    with pytest.raises(ValueError, match="method must be one of"):
        hvp(model, ce, b, v, method="finite-difference")
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="h must be a positive finite float"):
            hvp(model, ce, b, v, h=bad)
    with pytest.raises(TypeError, match="h must be a positive float"):
        hvp(model, ce, b, v, h="1e-20")
    with pytest.raises(ValueError, match="exact=True applies to method='complex-step' only"):
        hvp(model, ce, b, v, method="double-backward", exact=True)
    with pytest.raises(ValueError, match="h applies to method='complex-step' only"):
        hvp(model, ce, b, v, method="ggn", h=1.0)
    with pytest.raises(ValueError, match="jvp must be one of"):
        hvp(model, ce, b, v, method="ggn", jvp="vmap")
    with pytest.raises(TypeError, match=r"batch must be a pair \(inputs, targets\)"):
        hvp(model, ce, x, v)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        hvp(lambda t: t, ce, b, v)
    with pytest.raises(ValueError, match="must return a scalar tensor"):
        hvp(model, lambda o, t: o, b, v)
    with pytest.raises(ValueError, match="must return a scalar tensor"):
        hvp(model, lambda o, t: o, b, v, method="ggn")
    with pytest.raises(ValueError, match=r"params\[0\] \(\(7,\)\) is not a trainable parameter"):
        hvp(model, ce, b, v[:1], params=[torch.zeros(7, dtype=D)])
    ps = trainable(model)[1]
    with pytest.raises(ValueError, match="appears twice"):
        hvp(model, ce, b, [v[1], v[1]], params=[ps[1], ps[1]])
    with pytest.raises(ValueError, match="blocks overlap"):
        block_ggn_vp(model, ce, b, [[ps[0]], [ps[0]]], [[v[0]], [v[0]]])
    with pytest.raises(ValueError, match="one vector list per block"):
        block_ggn_vp(model, ce, b, [[ps[0]], [ps[1]]], [[v[0]]])
    with pytest.raises(TypeError, match="vector_sets must be a list"):
        hvp_many(model, ce, b, v[0])
    with pytest.raises(ValueError, match=r"vector_sets\[1\] has 1 tensors"):
        hvp_many(model, ce, b, [v, v[:1]])


# --------------------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------------------
def test_compiled_complex_step_hvp_fullgraph(monkeypatch: pytest.MonkeyPatch) -> None:
    """The complex-step HVP of an MLP compiles into one graph (torch.autograd.grad traced with
    ``torch._dynamo.config.trace_autograd_ops=True``; without it autograd.grad is a graph break)."""
    import torch._dynamo

    monkeypatch.setattr(torch._dynamo.config, "trace_autograd_ops", True)
    torch.manual_seed(14)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 3))
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    v = randvec(model)

    def f(x: torch.Tensor, y: torch.Tensor, v: list[torch.Tensor]) -> list[torch.Tensor]:
        return hvp(model, F.cross_entropy, (x, y), v)

    torch._dynamo.reset()
    explained = torch._dynamo.explain(f)(x, y, v)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(x, y, v)
    ref = hvp(model.double(), F.cross_entropy, (x.double(), y), [t.double() for t in v], method="double-backward")
    assert rel([g.double() for g in got], ref) <= 1e-5
    torch._dynamo.reset()
