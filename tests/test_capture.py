"""Tests for fastcurv.capture: statistics vs an eager autograd reference, in eager and under torch.compile.

The reference records every call's input and output with forward hooks (capture paused), takes
``torch.autograd.grad`` w.r.t. the outputs, builds the rows independently (conv patches by slicing, not
``F.unfold``) and pools all calls: A = ĀᵀĀ/n, G = gᵀg/n (g = N·dL/dh), means, counts.
Compile budget: one small "combo" model (convs with/without bias, stride/padding, a weight-shared linear,
a bias-free linear) serves every compiled test; inductor graphs are shared between the default and the
fullgraph compile through inductor's FX-graph cache.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

from fastcurv import capture as capmod
from fastcurv.capture import STATS, Capture, CapturedConv2d, CapturedLinear, Mode

F64 = torch.float64
COUNTS = {"A": "n_A", "a_mean": "n_a", "h_mean": "n_h", "G": "n_G", "g_mean": "n_g"}


# --------------------------------------------------------------------------------------------------------
# models (float64)
# --------------------------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, shared: bool = False) -> None:
        super().__init__()
        self.shared = shared
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.fc2(torch.tanh(self.fc1(x))))
        if self.shared:
            x = torch.tanh(self.fc2(x))  # weight sharing: fc2 called twice
        return self.fc3(x)


class Seq(MLP):
    """Linear layers on (N, T, d) inputs: T rows per sample, grad_scale N."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).mean(1)


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 4, (3, 2), stride=2, padding=(1, 0), bias=False)
        self.fc = nn.Linear(4 * 3 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.c2(torch.tanh(self.c1(x))))
        return self.fc(x.flatten(1))


class Combo(nn.Module):
    """Everything in one graph: conv ± bias, stride/padding, shared linear, bias-free linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 2, 3, stride=2, padding=1, bias=False)
        self.fc1, self.fc2, self.fc3 = nn.Linear(2 * 3 * 3, 5), nn.Linear(5, 5), nn.Linear(5, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.c2(torch.tanh(self.c1(x)))).flatten(1)
        x = torch.tanh(self.fc2(torch.tanh(self.fc2(torch.tanh(self.fc1(x))))))
        return self.fc3(x)


MODELS = {"mlp": (lambda: MLP(), (6,)), "cnn": (CNN, (2, 6, 5)), "shared": (lambda: MLP(True), (6,)),
          "seq": (Seq, (4, 6)),
          "combo": (Combo, (2, 6, 6))}


def make(kind: str, seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(seed)
    ctor, shape = MODELS[kind]
    return ctor().double(), shape


def batch(shape: tuple[int, ...], n: int, seed: int, dtype: torch.dtype = F64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y)


# --------------------------------------------------------------------------------------------------------
# the eager reference
# --------------------------------------------------------------------------------------------------------
def patches_by_slicing(mod: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Conv2d input patches (N·L, C·kh·kw) built by strided slicing (independent of F.unfold)."""
    ph, pw = mod.padding
    x = F.pad(x, (pw, pw, ph, ph))
    (kh, kw), (sh, sw), (dh, dw) = mod.kernel_size, mod.stride, mod.dilation
    N, C, H, W = x.shape
    Ho, Wo = (H - dh * (kh - 1) - 1) // sh + 1, (W - dw * (kw - 1) - 1) // sw + 1
    cols = [
        x[:, :, i * dh : i * dh + sh * (Ho - 1) + 1 : sh, j * dw : j * dw + sw * (Wo - 1) + 1 : sw]
        for i in range(kh)
        for j in range(kw)
    ]
    P = torch.stack(cols, dim=2)  # (N, C, kh*kw, Ho, Wo): columns channel-major like weight.flatten(1)
    return P.reshape(N, C * kh * kw, Ho * Wo).transpose(1, 2).reshape(-1, C * kh * kw)


def rows_of(t: torch.Tensor, conv: bool) -> torch.Tensor:
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]) if conv else t.reshape(-1, t.shape[-1])


def reference(model: nn.Module, cap: Capture, x: torch.Tensor, y: torch.Tensor, scale: float | None = None):
    """Per layer name: dict of the statistics of one forward/backward on (x, y), from hooks + autograd.grad,
    plus the raw rows ("rows_a", "rows_h", "rows_dh") for layout checks."""
    rec: dict[str, list] = {st.name: [] for st in cap.layers}
    hs = [
        st.module.register_forward_hook(lambda m, i, o, nm=st.name: rec[nm].append((i[0].detach(), o)))
        for st in cap.layers
    ]
    try:
        with cap.paused():
            loss = loss_fn(model(x), y)
    finally:
        for h in hs:
            h.remove()
    outs = [o for st in cap.layers for _, o in rec[st.name]]
    grads = iter(torch.autograd.grad(loss, outs))
    ref = {}
    for st in cap.layers:
        conv, A_rows, H_rows, D_rows, ns = st.kind == "conv2d", [], [], [], 0
        for xi, o in rec[st.name]:
            a = patches_by_slicing(st.module, xi) if conv else xi.reshape(-1, xi.shape[-1])
            if st.has_bias:
                a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
            A_rows.append(a)
            H_rows.append(rows_of(o.detach(), conv))
            D_rows.append(rows_of(next(grads), conv))
            ns += xi.shape[0]
        a, h, dh = torch.cat(A_rows), torch.cat(H_rows), torch.cat(D_rows)
        g = torch.cat([d * (xi.shape[0] if scale is None else scale) for d, (xi, _) in zip(D_rows, rec[st.name])])
        n = a.shape[0]
        ref[st.name] = dict(
            A=a.T @ a / n, G=g.T @ g / n, a_mean=a.mean(0), h_mean=h.mean(0), g_mean=g.mean(0),
            n_A=n, n_a=n, n_h=n, n_G=n, n_g=n, n_s=ns, rows_a=a, rows_h=h, rows_dh=dh,
        )  # fmt: skip
    return ref


def pooled(*refs: dict) -> dict:
    """The reference of several forward/backward calls in one step (statistics of the concatenated rows)."""
    out = {}
    for name in refs[0]:
        r = [ref[name] for ref in refs]
        n = sum(x["n_A"] for x in r)
        d = {k: sum(x[k] * x["n_A"] for x in r) / n for k in STATS}
        d.update({c: n for c in COUNTS.values()}, n_s=sum(x["n_s"] for x in r))
        out[name] = d
    return out


def assert_stats(cap: Capture, ref: dict, names=STATS, rtol: float = 1e-12, atol: float = 1e-13) -> None:
    for st in cap.layers:
        for k in names:
            torch.testing.assert_close(getattr(st, k), ref[st.name][k], rtol=rtol, atol=atol, msg=f"{st.name}.{k}")
            assert int(getattr(st, COUNTS[k])) == ref[st.name][COUNTS[k]], f"{st.name}.{COUNTS[k]}"
        if "A" in names:
            assert int(st.n_s) == ref[st.name]["n_s"]


def snapshot(cap: Capture) -> list[torch.Tensor]:
    return [t.clone() for st in cap.layers for t in st.tensors()]


def assert_unchanged(cap: Capture, snap: list[torch.Tensor], names=STATS) -> None:
    now = [t for st in cap.layers for t in st.tensors()]
    full = [k for k in STATS for _ in range(3 if k == "A" else 2)]  # layout of LayerStats.tensors()
    per = len(full)
    for i, (a, b) in enumerate(zip(snap, now)):
        if full[i % per] in names:
            assert torch.equal(a, b), f"{cap.layers[i // per].name}: {full[i % per]} changed"


def sgd_(model: nn.Module, lr: float = 0.2) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
            p.grad = None


def train_and_check(model, cap, run, shape, sizes, *, tol=(1e-12, 1e-13), eval_size=1, seed=0):
    """Steps of (reset, reference, captured fwd/bwd via ``run``, compare, no_grad eval on a batch of
    ``n + eval_size`` rows, SGD)."""
    for k, n in enumerate(sizes):
        x, y = batch(shape, n, seed + k)
        cap.reset()
        ref = reference(model, cap, x, y)
        with cap.paused():
            ref_grads = torch.autograd.grad(loss_fn(model(x), y), list(model.parameters()))
        loss_fn(run(x), y).backward()
        assert_stats(cap, ref, rtol=tol[0], atol=tol[1])
        for p, gr in zip(model.parameters(), ref_grads):  # the tap does not change gradients
            torch.testing.assert_close(p.grad, gr, rtol=tol[0], atol=tol[1])
        snap = snapshot(cap)
        with torch.no_grad():
            run(batch(shape, n + eval_size, 100 + k)[0])
        assert_unchanged(cap, snap)
        sgd_(model)


# --------------------------------------------------------------------------------------------------------
# eager
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "cnn", "shared", "seq"])
def test_eager_matches_reference(kind: str) -> None:
    model, shape = make(kind)
    cap = Capture(model, dtype=F64)
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert [st.name for st in cap.layers] == names
    train_and_check(model, cap, model, shape, sizes=[8, 5, 8])  # variable batch size, no_grad eval between
    # gradient accumulation: two forward/backward calls in one step = statistics of the concatenated rows
    (x1, y1), (x2, y2) = batch(shape, 4, 7), batch(shape, 9, 8)
    cap.reset()
    ref = pooled(reference(model, cap, x1, y1), reference(model, cap, x2, y2))
    loss_fn(model(x1), y1).backward()
    loss_fn(model(x2), y2).backward()
    assert_stats(cap, ref)


def test_layout_and_shapes() -> None:
    """a rows follow weight.flatten(1) (+ bias column): h = Ā W̄ᵀ; grad_matrix = Σ (dL/dh) āᵀ; shapes/dtypes."""
    model, shape = make("cnn")
    cap = Capture(model, dtype=F64)
    x, y = batch(shape, 3, 1)
    ref = reference(model, cap, x, y)
    loss_fn(model(x), y).backward()
    for st in cap.layers:
        r = ref[st.name]
        gm = st.grad_matrix()
        assert gm.shape == (st.d_g, st.d_a)
        torch.testing.assert_close(gm, r["rows_dh"].T @ r["rows_a"], rtol=1e-12, atol=1e-13)
        Wbar = torch.cat([st.module.weight.flatten(1)] + ([st.module.bias[:, None]] if st.has_bias else []), 1)
        torch.testing.assert_close(r["rows_a"] @ Wbar.detach().T, r["rows_h"], rtol=1e-12, atol=1e-13)
        assert st.A.shape == (st.d_a, st.d_a) and st.G.shape == (st.d_g, st.d_g)
        assert st.a_mean.shape == (st.d_a,) and st.h_mean.shape == st.g_mean.shape == (st.d_g,)
        assert all(t.dtype == F64 for t in (st.A, st.G, st.a_mean, st.h_mean, st.g_mean))
        assert st.n_A.shape == (1,) and st.n_A.dtype == torch.int64
        if st.has_bias:
            assert float(st.a_mean[-1]) == 1.0
    assert [(st.kind, st.has_bias, st.d_a, st.d_g) for st in cap.layers] == [
        ("conv2d", True, 2 * 9 + 1, 3), ("conv2d", False, 3 * 6, 4), ("linear", True, 25, 3)]  # fmt: skip
    assert int(cap.layers[0].n_A) == 3 * 30 and int(cap.layers[0].n_s) == 3  # L = 6·5 positions


@pytest.mark.parametrize(
    "conv",
    [
        dict(kernel_size=3, padding="same"),
        dict(kernel_size=(2, 4), padding="same", dilation=(2, 1)),  # asymmetric "same" padding
        dict(kernel_size=3, padding=2, padding_mode="reflect", stride=(2, 1)),
        dict(kernel_size=(1, 3), padding="valid", bias=False),
        dict(kernel_size=3, padding=(0, 1), padding_mode="circular", dilation=2),
    ],
)
@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
def test_conv_patches_reproduce_the_convolution(conv: dict) -> None:
    """For every padding mode/string padding, patches @ W̄ᵀ = the conv output rows (pins the convention)."""
    torch.manual_seed(0)
    mod = nn.Conv2d(3, 4, **conv).double()
    x = torch.randn(2, 3, 7, 8, dtype=F64)
    a = capmod._conv_patches(mod, x)
    h = rows_of(mod(x), conv=True)
    ref = a @ mod.weight.flatten(1).T + (0 if mod.bias is None else mod.bias)
    torch.testing.assert_close(ref, h, rtol=1e-12, atol=1e-12)
    assert torch.equal(capmod._conv_patches(mod, x[0]), capmod._conv_patches(mod, x[:1]))  # unbatched input


def test_modes_kbfgs_flow_and_off() -> None:
    """K-BFGS: pass 1 "a_factor+means"; reset the means; pass 2 "means" at θ+αp on the same batch leaves
    A (and G, a_mean) bitwise unchanged while h_mean/g_mean are those of θ+αp. "off"/paused: nothing."""
    model, shape = make("shared")
    cap = Capture(model, dtype=F64)
    x, y = batch(shape, 6, 3)
    cap.reset()
    ref = reference(model, cap, x, y)
    with cap.mode("a_factor+means"):
        assert cap.stats_on == {"A", "a_mean", "h_mean", "g_mean"}
        loss_fn(model(x), y).backward()
    assert cap.stats_on == frozenset(STATS)  # restored
    assert_stats(cap, ref, names=("A", "a_mean", "h_mean", "g_mean"))
    assert all(int(st.n_G) == 0 and not st.G.any() for st in cap.layers)
    snap = snapshot(cap)
    cap.reset("h_mean", "g_mean")
    assert all(int(st.n_h) == 0 and not st.h_mean.any() for st in cap.layers)
    assert_unchanged(cap, snap, names=("A", "a_mean", "G"))
    sgd_(model)  # θ + αp
    ref2 = reference(model, cap, x, y)
    with cap.mode(Mode.MEANS):
        loss_fn(model(x), y).backward()
    assert_unchanged(cap, snap, names=("A", "a_mean", "G"))
    assert_stats(cap, ref2, names=("h_mean", "g_mean"))
    assert not torch.allclose(cap.layers[0].h_mean, ref[cap.layers[0].name]["h_mean"])  # the pass did change them
    # off / paused / explicit subsets
    snap = snapshot(cap)
    for ctx in (cap.mode("off"), cap.paused(), cap.mode(())):
        with ctx:
            loss_fn(model(x), y).backward()
        assert_unchanged(cap, snap)
    with cap.mode({"G"}):
        loss_fn(model(x), y).backward()
    assert_unchanged(cap, snap, names=("A", "a_mean", "h_mean", "g_mean"))
    assert int(cap.layers[1].n_G) == 2 * 6  # fc2 twice
    # the mode at forward time decides what the backward accumulates
    cap.reset()
    with cap.mode("off"):
        out = model(x)
    loss_fn(out, y).backward()
    assert all(int(st.n_G) == 0 for st in cap.layers)
    cap.set_mode("means")
    assert cap.stats_on == {"h_mean", "g_mean"}
    with pytest.raises(ValueError, match="mode must be one of"):
        cap.set_mode("bogus")
    with pytest.raises(ValueError, match="unknown statistic"):
        cap.mode({"A", "B"}).__enter__()
    with pytest.raises(ValueError, match="unknown statistic"):
        cap.reset("H")


def test_grad_scale_float_and_inplace_relu() -> None:
    """grad_scale=c gives G = c²/N² × G_batch; an in-place op on a captured output is allowed and harmless."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)).double()
    net2 = copy.deepcopy(net)
    net2[1] = nn.ReLU()
    x, y = batch((4,), 6, 0)
    c1, c2 = Capture(net, dtype=F64), Capture(net2, dtype=F64, grad_scale=1.5)
    loss_fn(net(x), y).backward()
    loss_fn(net2(x), y).backward()
    for s1, s2 in zip(c1.layers, c2.layers):
        torch.testing.assert_close(s2.G, s1.G * (1.5 / 6) ** 2, rtol=1e-12, atol=0)
        torch.testing.assert_close(s2.g_mean, s1.g_mean * (1.5 / 6), rtol=1e-12, atol=0)
        for k in ("A", "a_mean", "h_mean"):
            torch.testing.assert_close(getattr(s2, k), getattr(s1, k), rtol=1e-12, atol=0)
    for p, q in zip(net.parameters(), net2.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=0)
    assert c2.grad_scale == 1.5 and c1.grad_scale == "batch"


def test_low_precision_and_dtypes() -> None:
    """bf16 activations with float32 statistics; float64 activations with float32 statistics."""
    model, shape = make("mlp")
    x, y = batch(shape, 16, 0)
    cap = Capture(model, dtype=F64)
    ref = reference(model, cap, x, y)
    cap.remove()
    for act_dtype, tol in ((torch.bfloat16, 5e-2), (F64, 1e-6)):
        m = copy.deepcopy(model).to(act_dtype)
        cap = Capture(m)  # float32 statistics
        loss_fn(m(x.to(act_dtype)).double(), y).backward()
        for st in cap.layers:
            assert st.A.dtype == torch.float32
            for k in STATS:
                r = ref[st.name][k].float()
                torch.testing.assert_close(getattr(st, k), r, rtol=tol, atol=tol * float(r.abs().max()))


def test_remove_restores_classes_and_outputs() -> None:
    model, shape = make("combo")
    plain = copy.deepcopy(model)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    with Capture(model, dtype=F64) as cap:
        assert isinstance(model.c1, CapturedConv2d) and isinstance(model.fc1, CapturedLinear)
        assert capmod.is_captured(model.fc2) and not capmod.is_captured(model)
        assert isinstance(model.c1, nn.Conv2d) and model.state_dict().keys() == sd.keys()
        x, _ = batch(shape, 4, 0)
        assert torch.equal(model(x), plain(x))
        model(x).sum().backward()
    assert [type(m) for m in model.modules()] == classes and not capmod.is_captured(model.fc2)
    assert not any(hasattr(m, "_fastcurv_stats") for m in model.modules())
    assert int(cap.layers[0].n_A) > 0  # statistics stay readable
    assert torch.equal(model(x), plain(x))
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    cap.remove()  # idempotent
    with pytest.raises(RuntimeError, match="removed"):
        cap.reset()
    Capture(model).remove()  # can be captured again


def test_layer_selection_and_unsupported_params() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.LayerNorm(2), nn.Linear(2, 3), nn.Conv2d(4, 2, 1))
    cap = Capture(model, layers=["2", model[3]])
    assert [st.name for st in cap.layers] == ["2", "3"]
    assert Capture.unsupported_params(model) == [model[0].weight, model[0].bias, model[1].weight, model[1].bias]
    cap.remove()
    cap = Capture(model)
    assert [st.name for st in cap.layers] == ["2", "3"]  # grouped conv skipped by default
    cap.check_owner()
    new = Capture(model, layers=[model[2]])  # a second Capture takes the layer over ...
    assert model[2]._fastcurv_stats is new.layers[0] and type(model[2]) is capmod.CapturedLinear
    with pytest.raises(RuntimeError, match=r"\['2'\] were taken over"):  # ... and the first one knows it
        cap.check_owner()
    cap.remove()  # leaves the layer it lost to its new owner
    assert type(model[2]) is capmod.CapturedLinear and type(model[3]) is nn.Conv2d
    new.remove()
    assert type(model[2]) is nn.Linear
    with pytest.raises(TypeError, match="grouped"):
        Capture(model, layers=[model[0]])
    with pytest.raises(TypeError, match="LayerNorm"):
        Capture(model, layers=["1"])
    with pytest.raises(ValueError, match="no submodule"):
        Capture(model, layers=["9"])
    with pytest.raises(ValueError, match="not part of the model"):
        Capture(model, layers=[nn.Linear(2, 2)])
    with pytest.raises(TypeError, match="dtype"):
        Capture(model, dtype=torch.float16)
    with pytest.raises(ValueError, match="grad_scale"):
        Capture(model, grad_scale="sum")
    with pytest.raises(TypeError, match="grad_scale"):
        Capture(model, grad_scale=None)  # type: ignore[arg-type]
    assert not any(isinstance(m, capmod._CaptureMixin) for m in model.modules())  # failures left no swap


# --------------------------------------------------------------------------------------------------------
# regression tests for the inductor pitfalls the accumulation pattern avoids (docs/capture.md 3 and 4)
# --------------------------------------------------------------------------------------------------------
def test_accumulation_pattern_under_inductor() -> None:
    """Pitfall 3: ``A.add_(XᵀX, alpha=c)`` after an mm is miscompiled (alpha dropped) — the factor goes
    through the opaque op with β = n/(n+m). Pitfall 4: in-place updates of a 0-d float64 counter are lost —
    counters are int64 (1,). Three accumulating calls of the compiled update must equal the closed form
    (a 0-d float64 counter or an ``alpha=`` add fails this same check: error O(1) / counter stuck at 0)."""
    torch._dynamo.reset()

    def step(A, n_A, mean, n_m, x, w):
        rows = x @ w  # an mm feeding the accumulation, the shape that triggers pitfall 3
        capmod._factor_update_(A, n_A, rows)
        capmod._mean_update_(mean, n_m, torch.ones(1, rows.shape[0], dtype=rows.dtype).mm(rows)[0], rows.shape[0])

    cstep = torch.compile(step, backend="inductor", fullgraph=True)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 3, dtype=F64, generator=g)
    xs = [torch.randn(7, 3, dtype=F64, generator=g) for _ in range(3)]
    # the buffers exactly as a layer allocates them (a counter-dtype regression is caught here too)
    st = capmod.LayerStats(nn.Linear(3, 2, bias=False), "l", capmod._State(frozenset(), None), F64)
    for x in xs:
        cstep(st.A, st.n_A, st.a_mean, st.n_a, x, w)
    R = torch.cat([x @ w for x in xs])
    torch.testing.assert_close(st.A, R.T @ R / 21, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(st.a_mean, R.mean(0), rtol=1e-12, atol=1e-13)
    assert st.n_A.tolist() == st.n_a.tolist() == [21]


# --------------------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------------------
def graph_breaks() -> int:
    return sum(counters["graph_break"].values())


def test_compiled_aot_eager_modes_variable_batch() -> None:
    """dynamo + AOTAutograd (eager kernels), fullgraph: all statistics match tightly with variable batch
    sizes and no_grad eval between steps; mode switches recompile once per mode, never break the graph,
    and switching back reuses the cached graph. Capture attached *after* compile works too."""
    torch._dynamo.reset()
    counters.clear()
    model, shape = make("combo")
    cm = torch.compile(model, backend="aot_eager", fullgraph=True)
    x, y = batch(shape, 4, 50)
    loss_fn(cm(x), y).backward()  # compiled before the capture exists
    model.zero_grad()
    cap = Capture(model, dtype=F64)
    train_and_check(model, cap, cm, shape, sizes=[8, 5, 8], tol=(1e-12, 1e-13))
    # K-BFGS flow under compile
    x, y = batch(shape, 6, 9)
    cap.reset()
    ref = reference(model, cap, x, y)
    with cap.mode("a_factor+means"):
        loss_fn(cm(x), y).backward()
    assert_stats(cap, ref, names=("A", "a_mean", "h_mean", "g_mean"))
    snap = snapshot(cap)
    cap.reset("h_mean", "g_mean")
    sgd_(model)
    ref2 = reference(model, cap, x, y)
    with cap.mode("means"):
        loss_fn(cm(x), y).backward()
    assert_unchanged(cap, snap, names=("A", "a_mean", "G"))
    assert_stats(cap, ref2, names=("h_mean", "g_mean"))
    snap = snapshot(cap)
    with cap.paused():
        loss_fn(cm(x), y).backward()
    assert_unchanged(cap, snap)
    graphs = counters["stats"]["unique_graphs"]
    for mode in ("a_factor+means", "means", "off"):  # all seen before: no new graph
        with cap.mode(mode):
            loss_fn(cm(x), y).backward()
    assert counters["stats"]["unique_graphs"] == graphs
    assert graph_breaks() == 0
    cap.remove()
    model.zero_grad()
    plain, _ = make("combo")
    plain.load_state_dict(model.state_dict())
    assert torch.equal(cm(x), plain(x))  # recompiles for the restored classes


def test_compiled_inductor_default_and_fullgraph() -> None:
    """Inductor, default and fullgraph=True (same graphs, inductor's cache shares the compile): statistics
    and gradients match the eager reference to ~1e-12 with a no_grad eval between steps; 0 graph breaks."""
    torch._dynamo.reset()
    counters.clear()
    model, shape = make("combo")
    cap = Capture(model, dtype=F64)
    for fullgraph in (False, True):
        torch._dynamo.reset()  # else the fullgraph module would reuse the default compile's cache entries
        cm = torch.compile(model, fullgraph=fullgraph)
        train_and_check(model, cap, cm, shape, sizes=[8, 8], tol=(1e-12, 1e-12), seed=10 * fullgraph, eval_size=0)
    assert graph_breaks() == 0
