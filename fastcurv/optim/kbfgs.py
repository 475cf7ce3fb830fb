r"""K-BFGS and K-BFGS(L) (Goldfarb, Ren & Bahamou, NeurIPS 2020): Kronecker-factored BFGS / L-BFGS.

A faithful port of the official code (``renyiryry/kbfgs_neurips2020_public``, ``kbfgs_utils.py``,
``training_function.py``, ``training_utils.py``; docs/algorithms.md §1). With its defaults, :class:`KBFGS` and
:class:`KBFGSL` reproduce the official iteration step for step in float64 (checked by an independent
re-implementation in ``tests/optim/test_kbfgs.py``).

Notation (the paper's, *not* the code's: the code calls the layer input ``h`` and the pre-activation
``a``). Layer :math:`l`: input rows :math:`\bar a = [a; 1]` (:math:`d_a = d_{in} + 1`; no homogeneous 1
without a bias), pre-activation :math:`h = \bar W\bar a` (:math:`d_g = d_{out}`), :math:`\bar W = [W \mid b]`,
per-sample pre-activation gradient :math:`g = N\,\partial L/\partial h` (:math:`N` = batch size; the loss
is a batch mean). The preconditioner of layer :math:`l` is :math:`H_a \otimes H_g`
(:math:`\operatorname{vec}(H_g \hat G H_a) = (H_a\otimes H_g)\operatorname{vec}\hat G`).

One step :math:`k` (``loss = opt.step(closure)``; the optimizer runs the closure and ``backward`` twice)
------------------------------------------------------------------------------------------------------
0. Forward/backward on the minibatch at :math:`\theta_k`; the layer statistics are captured by
   :class:`fastcurv.capture.Capture` (batch :math:`A_B = \frac1n\sum_i \bar a_i\bar a_i^\top`, means
   :math:`\bar a`, :math:`\bar h`, :math:`\bar g`).
1. Gradient with coupled L2 (on weights **and** biases): :math:`g_\theta = \nabla L + \tau\theta`;
   momentum in EMA form, zero start, no bias correction: :math:`\hat G \leftarrow \rho\hat G + (1-\rho)g_\theta`.
2. :math:`A \leftarrow \beta A + (1-\beta)A_B` (``stat_decay`` :math:`\beta` = 0.9). At the first step:
   after :meth:`warm_start` :math:`A` is left as the warm-start mean (the official code skips this update
   at :math:`k = 0`); without it :math:`A = A_B`, the first minibatch's statistic (the official code has
   no such case for minibatches; this is the documented choice). :math:`A_{LM} = A + \sqrt\lambda I`.
   At the first step only: :math:`H_a = A_{LM}^{-1}` (the only explicit inverse) and :math:`H_g = I`.
3. Direction with the **current** factors, :math:`p = -H_g\hat G H_a` per layer, then
   :math:`\theta_{k+1} = \theta_k + \alpha p` (written into the parameters).
4. Second forward/backward on the **same** minibatch at :math:`\theta_{k+1}` (means :math:`\bar h^+`,
   :math:`\bar g^+` only).
5. :math:`H_g` pair (old − new, as in the code): :math:`s = \bar h - \bar h^+`, :math:`y = \bar g - \bar g^+`;
   EMA :math:`\bar s \leftarrow \gamma\bar s + (1-\gamma)s`, :math:`\bar y \leftarrow \gamma\bar y +
   (1-\gamma)y` (``pair_decay`` :math:`\gamma` = 0.9; the code uses 0 for full-batch training — pass
   ``pair_decay=0.0`` then). The stored EMA is undamped; a copy goes through double damping
   (:func:`fastcurv.ops.damped_pair`: Powell with :math:`\mu_1 = 0.2`, then Levenberg–Marquardt with
   :math:`\mu_2 = \sqrt\lambda`), then
   * :class:`KBFGS`: dense BFGS inverse update of :math:`H_g` (:func:`fastcurv.ops.damped_bfgs_update_foreach_`),
     skipped when :math:`\tilde s^\top\tilde y \le 0`, :math:`\tilde s^\top\tilde y \le 10^{-4}\,
     \tilde s^\top\tilde s\,\lVert\bar g\rVert` or the result is not finite;
   * :class:`KBFGSL`: the damped pair is appended to a FIFO memory of ``history`` pairs (compact form,
     :math:`H_0 = I`, :mod:`fastcurv.optim._lbfgs`) iff it is finite and :math:`\tilde s^\top\tilde y >
     10^{-4}\,\tilde s^\top\tilde s\,\lVert\bar g\rVert`.
6. :math:`H_a` "Hessian-action" pair (both variants, dense BFGS, no damping): :math:`s_a = H_a\bar a`,
   :math:`y_a = A_{LM}s_a = A s_a + \sqrt\lambda s_a` (:math:`s_a^\top y_a > 0` always), skip rules as
   above with :math:`\lVert\bar a\rVert` (``damped_bfgs_update_foreach_`` with both dampings off).

Choices and deviations (all documented here; none changes the default float64 iteration):

* The second evaluation point *is* :math:`\theta_{k+1}` (the code evaluates a deep copy at
  :math:`\theta_k + \alpha p` and then applies the same :math:`\alpha p`), so the parameters are written
  once; a snapshot restores :math:`\theta_k` if the step is skipped.
* After ``step`` each parameter's ``.grad`` holds the first-pass gradient (of the returned loss).
* The second pass backpropagates only to what the pairs need (:math:`\partial L/\partial h` per layer,
  through the layers' biases), skipping the weight-gradient GEMMs the code computes and discards.
* ``Conv2d`` (no official counterpart): the rows are the ``F.unfold`` patches (K-FAC for convolutions),
  :math:`A`, :math:`\bar a`, :math:`\bar h`, :math:`\bar g` are means over the :math:`N\cdot L` rows (L =
  output positions) and :math:`g = N\,\partial L/\partial h`; for :math:`L = 1` this is the linear case.
* The L-BFGS acceptance test also rejects pairs with non-finite entries (the code only tests
  :math:`s^\top s` for inf). The BFGS finiteness rule is the op's a-priori bound (see
  :func:`fastcurv.reference.damped_bfgs_update_`). Damping tests are cross-multiplied (``≥`` on the
  no-damping side), identical to the code's ratios for positive denominators.
* Layers: every ``nn.Linear`` and ``nn.Conv2d`` (``groups=1``) whose parameters all require grad and are
  not shared with another layer; all other parameters go to the base class's fallback
  (``fallback="sgd"``: SGD with the same EMA momentum, ``lr`` and coupled ``weight_decay``), listed by
  :meth:`describe`. The fallback update uses the first-pass gradient and is applied after the second pass.
* Non-finite loss, gradient, captured statistic or direction (first pass) or loss / statistic (second
  pass): the step is skipped with every parameter and state tensor bitwise unchanged (one host sync per
  step decides), ``skipped_steps`` counts it, ``on_nonfinite="raise"`` raises ``FloatingPointError``.
  A *curvature pair* that fails a skip rule is not a skipped step: that one factor update is skipped, as
  in the code (counted per layer, see :meth:`counters`).

Blow-up guard (``blowup_factor`` :math:`c`, default 1.5; None turns it off), after Martens' Levenberg–Marquardt
rule (Martens 2010 §4.1): step 4 already evaluates the loss at :math:`\theta_{k+1}` on the same minibatch, so
the guard costs nothing. If :math:`L(\theta_{k+1}) - L(\theta_k) > (c-1)\,|L(\theta_k)|` (for a nonnegative
loss: :math:`L(\theta_{k+1}) > c\,L(\theta_k)`) the step is **rejected** exactly like a
non-finite one — parameters restored, no state written (phase 1 is functional and phase 2 has not run), so
everything is bitwise unchanged — and the damping is raised, :math:`\lambda \leftarrow \min(\frac32\lambda,
1)` (``LM_BOOST``, Martens' factor; ``MAX_DAMPING`` = 1 because :math:`\mu_2 = \sqrt\lambda > 1` breaks the
damped :math:`H_g` pair, see :func:`fastcurv.ops.damped_pair`). Once the damping is at 1 a rejection divides
``lr`` by :math:`\frac32` instead: :math:`\lambda` reaches the direction only through the BFGS recursions (not
as a Tikhonov term of an explicit inverse, as in K-FAC), so raising it barely changes the next step, and the
step size is the remaining trust-region knob. Both are written into ``param_groups[0]`` (a scheduler that sets
them each step overrides this) and never lowered automatically; ``counters()["rejected_steps"]`` counts the
rejections. Under data parallelism the guard is off (the ranks' local losses differ; agreeing on a global
one would cost an all-reduce per step). Deviation from Martens: no reduction ratio :math:`\rho` against a quadratic model, no
automatic lowering; :math:`c = 1.5` because on the generated CURVES the paper's settings diverge through
same-minibatch jumps of 2× and more (169.9 → 348.7 → ... → NaN within six steps), while steps that recover
stay below 1.5×. With the default guard the paper's defaults are kept: they no longer diverge on CURVES.

Data parallel (DDP; :mod:`fastcurv.distributed`): the captured :math:`A_B`, :math:`\bar a`, :math:`\bar h`,
:math:`\bar g` (and :math:`\bar h^+`, :math:`\bar g^+`) are averaged over the ranks (weighted by rows), the
second pass runs under ``ddp.no_sync()``, and the skip decision is agreed by all ranks; with
``distributed="owner"`` each layer's phase-2 update runs on one rank and is shared. A non-finite value in
the state (corrupted from outside) makes the step skip and re-initialises that layer (``state_resets``).
Mixed precision: ``step(closure, scaler=...)``. See docs/distributed.md.

Performance: the update part of the step is two functions of tensors (phase 1 before the second closure,
phase 2 after it), each compiled with ``torch.compile(fullgraph=True, dynamic=False)`` when ``compile`` is
on (``"auto"``: on CUDA) — two graphs in all. The first step (the only one that inverts :math:`A_{LM}`)
runs phase 1 eagerly instead of compiling a graph used once. Hyperparameters are 0-d tensors, so
schedulers never recompile; state shapes are fixed (the L-BFGS memory too), so nothing else does.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from fastcurv import ops
from fastcurv import distributed as fdist
from fastcurv.capture import Capture, base_type
from fastcurv.optim._base import Closure, CurvatureOptimizer, Open, finite_flag, maybe_compile
from fastcurv.optim._lbfgs import lbfgs_append, lbfgs_apply, lbfgs_memory

__all__ = ["KBFGS", "KBFGSL", "POWELL_MU", "CURVATURE_TOL"]

#: Powell damping constant :math:`\mu_1` (hard-coded 0.2 in the official code).
POWELL_MU = 0.2
#: Curvature skip-rule tolerance (:math:`10^{-4}` in the official code).
CURVATURE_TOL = 1e-4
#: :math:`\gamma` of the L-BFGS initial matrix :math:`H_0 = \gamma I` (official ``Kron_LBFGS_Hg_initial``).
LBFGS_GAMMA = 1.0


# --------------------------------------------------------------------------------------------------------
# the two compiled phases (pure functions of tensors; static Python flags are keyword-only)
# --------------------------------------------------------------------------------------------------------
def _homogeneous(w: Tensor, b: Tensor | None, dtype: torch.dtype) -> Tensor:
    r""":math:`[W\text{.flatten}(1) \mid b]` of shape ``(d_g, d_a)`` in ``dtype``."""
    w2 = w.reshape(w.shape[0], -1).to(dtype)
    if b is None:
        return w2
    return torch.cat([w2, b.to(dtype).unsqueeze(1)], dim=1)


def _phase1(
    weights: list[Tensor],
    biases: list[Tensor | None],
    wgrads: list[Tensor],
    bgrads: list[Tensor | None],
    fb_grads: list[Tensor],
    moms: list[Tensor],
    As: list[Tensor],
    A_batches: list[Tensor],
    a_means: list[Tensor],
    h_means: list[Tensor],
    g_means: list[Tensor],
    Hgs: list[Tensor],
    lefts: list[Tensor],
    rights: list[Tensor],
    Has: list[Tensor],
    loss: Tensor,
    lr: Tensor,
    damping: Tensor,
    momentum: Tensor,
    weight_decay: Tensor,
    stat_decay: Tensor,
    *,
    first: bool,
    warm: bool,
    limited: bool,
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor], Tensor]:
    r"""Steps 1–3: momentum, :math:`A`, (first step: :math:`H_a = A_{LM}^{-1}`), direction,
    :math:`\theta \leftarrow \theta + \alpha p`.

    Functional for the optimizer state (returns new momentum, :math:`A`, :math:`H_a` and copies of the
    first-pass means; nothing in the state is written, so a later skip needs no rollback of the state);
    writes only the parameters. Returns ``(moms, As, Has, h_means, g_means, ok)``, ``ok`` a 0-d bool:
    every first-pass input and every direction is finite.
    """
    fin: list[Tensor] = [loss.reshape(1), *fb_grads]  # checked together at the end (one reduction)
    new_m: list[Tensor] = []
    new_A: list[Tensor] = []
    new_Ha: list[Tensor] = []
    h1: list[Tensor] = []
    g1: list[Tensor] = []
    sqrt_lam = damping.sqrt()
    for i, W in enumerate(weights):
        b = biases[i]
        dt = moms[i].dtype
        G = _homogeneous(wgrads[i], bgrads[i], dt)
        g = G + _homogeneous(W, b, dt) * weight_decay
        M = momentum * moms[i] + (1 - momentum) * g
        Ab = A_batches[i]
        if first:
            A = As[i] if warm else Ab.clone()
        else:
            A = stat_decay * As[i] + (1 - stat_decay) * Ab
        if first:
            eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
            Ha = torch.linalg.inv(A + sqrt_lam * eye).contiguous()  # inv returns a column-major result
        else:
            Ha = Has[i]
        X = lbfgs_apply(lefts[i], rights[i], M, LBFGS_GAMMA) if limited else Hgs[i] @ M
        delta = X @ Ha
        step = delta * (-lr)
        d_in = W[0].numel()
        W.add_(step[:, :d_in].reshape(W.shape).to(W.dtype))
        if b is not None:
            b.add_(step[:, d_in].to(b.dtype))
        fin += [G, Ab, a_means[i], h_means[i], g_means[i], delta, A]
        new_m.append(M)
        new_A.append(A)
        new_Ha.append(Ha)
        h1.append(h_means[i].clone())
        g1.append(g_means[i].clone())
    ok = finite_flag(fin, loss.device)
    return new_m, new_A, new_Ha, h1, g1, ok


def _phase2(
    As: list[Tensor],
    Has: list[Tensor],
    Hgs: list[Tensor],
    mem: list[list[Tensor]],
    s_avgs: list[Tensor],
    y_avgs: list[Tensor],
    rejected_g: list[Tensor],
    rejected_a: list[Tensor],
    a_means: list[Tensor],
    h1: list[Tensor],
    g1: list[Tensor],
    h2: list[Tensor],
    g2: list[Tensor],
    damping: Tensor,
    pair_decay: Tensor,
    *,
    limited: bool,
) -> None:
    r"""Steps 5–6, in place on the state: pair EMA, :math:`H_g` (BFGS or L-BFGS memory), :math:`H_a`.

    ``mem[i]`` is ``[S, Y, count, left, right]`` for :class:`KBFGSL` (``Hgs`` empty) and empty for
    :class:`KBFGS`. ``rejected_g`` / ``rejected_a`` are per-layer int64 ``(1,)`` counters of skipped
    factor updates.
    """
    mu2 = damping.sqrt()
    gnorms = []
    for i in range(len(As)):
        s = h1[i] - h2[i]
        y = g1[i] - g2[i]
        s_avgs[i].copy_(pair_decay * s_avgs[i] + (1 - pair_decay) * s)
        y_avgs[i].copy_(pair_decay * y_avgs[i] + (1 - pair_decay) * y)
        gnorms.append(torch.dot(g1[i], g1[i]).sqrt())
    if limited:
        for i in range(len(As)):
            S, Y, count, left, right = mem[i]
            s, y = s_avgs[i], y_avgs[i]
            Hy = lbfgs_apply(left, right, y, LBFGS_GAMMA)
            st, yt = ops.damped_pair(s, y, Hy, mu1=POWELL_MU, mu2=mu2)
            sy = torch.dot(st, yt)
            ss = torch.dot(st, st)
            accept = (
                torch.isfinite(st).all() & torch.isfinite(yt).all() & (sy > CURVATURE_TOL * ss * gnorms[i])
            )
            S2, Y2, c2, l2, r2 = lbfgs_append(S, Y, count, st, yt, accept, LBFGS_GAMMA)
            S.copy_(S2)
            Y.copy_(Y2)
            count.copy_(c2)
            left.copy_(l2)
            right.copy_(r2)
            rejected_g[i].add_((~accept).to(torch.int64))
    elif As:
        applied = ops.damped_bfgs_update_foreach_(
            Hgs, s_avgs, y_avgs, mu1=POWELL_MU, mu2=mu2, curvature_tol=CURVATURE_TOL, grad_norms=torch.stack(gnorms)
        )
        for i in range(len(As)):
            rejected_g[i].add_((~applied[i]).to(torch.int64))
    if not As:
        return
    sas, yas, anorms = [], [], []
    for i in range(len(As)):
        abar = a_means[i]
        sa = Has[i] @ abar
        sas.append(sa)
        yas.append(As[i] @ sa + sa * mu2)
        anorms.append(torch.dot(abar, abar).sqrt())
    applied_a = ops.damped_bfgs_update_foreach_(
        Has, sas, yas, mu1=None, mu2=None, curvature_tol=CURVATURE_TOL, grad_norms=torch.stack(anorms)
    )
    for i in range(len(As)):
        rejected_a[i].add_((~applied_a[i]).to(torch.int64))


# --------------------------------------------------------------------------------------------------------
# the optimizers
# --------------------------------------------------------------------------------------------------------
def _no_timer(name: str) -> contextlib.AbstractContextManager[Any]:
    return contextlib.nullcontext()


def _grad_or_zero(p: Tensor | None) -> Tensor | None:
    """``p.grad``, zeros for a parameter the closure did not reach, None for an absent bias."""
    if p is None:
        return None
    return p.grad if p.grad is not None else torch.zeros_like(p)


class _Layer:
    """Static description of one preconditioned layer."""

    def __init__(self, stats: Any) -> None:
        self.stats = stats
        self.module: nn.Module = stats.module
        self.name: str = stats.name
        self.weight: Tensor = stats.module.weight
        self.bias: Tensor | None = stats.module.bias
        self.d_a: int = stats.d_a
        self.d_g: int = stats.d_g


def _select_layers(model: nn.Module) -> tuple[list[nn.Module], list[str]]:
    """Modules to precondition (exact ``nn.Linear`` / ``nn.Conv2d`` with groups=1, all params trainable and
    not shared) and the reasons other candidates were left to the fallback."""
    cands: list[tuple[str, nn.Module]] = []
    notes: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            if base_type(m) not in (nn.Linear, nn.Conv2d):  # (a captured layer is taken over)
                notes.append(f"{name or '<root>'}: {type(m).__name__} is a subclass")
                continue
            if isinstance(m, nn.Conv2d) and m.groups != 1:
                notes.append(f"{name}: grouped convolution (groups={m.groups})")
                continue
            ps = [m.weight] + ([m.bias] if m.bias is not None else [])
            if not all(p.requires_grad for p in ps):
                notes.append(f"{name}: frozen parameters")
                continue
            cands.append((name, m))
    uses: dict[int, int] = {}
    for _, m in cands:
        for p in m.parameters(recurse=False):
            uses[id(p)] = uses.get(id(p), 0) + 1
    chosen = []
    for name, m in cands:
        if any(uses[id(p)] > 1 for p in m.parameters(recurse=False)):
            notes.append(f"{name}: parameters shared with another layer")
        else:
            chosen.append(m)
    return chosen, notes


class _KBFGSBase(CurvatureOptimizer):
    """Shared machinery of :class:`KBFGS` and :class:`KBFGSL` (see the module docstring)."""

    hyperparameters = {
        "lr": (0.0, None),
        "damping": (Open(0.0), None),  # sqrt(damping) is the LM damping of A and of H_g's update
        "momentum": (0.0, Open(1.0)),  # 1: the momentum never leaves 0
        "weight_decay": (0.0, None),
        "stat_decay": (0.0, Open(1.0)),  # 1: A never sees the data
        "pair_decay": (0.0, Open(1.0)),  # 1: the (s, y) pair never sees the data
    }
    _supports_scaler = True
    _supports_distributed = True
    _limited = False
    _label = "K-BFGS"

    #: Optional phase timer (benchmarks): ``name -> context manager`` wrapped around each phase of
    #: :meth:`step` — ``"pass1"`` (closure + backward with capture at θ_k), ``"phase1"`` (momentum, A,
    #: direction, θ update), ``"pass2"``, ``"check"`` (the host sync), ``"phase2"`` (pairs, H_g and H_a
    #: updates), ``"share"`` (``distributed="owner"`` only), ``"fallback"``. None (default): no timing.
    phase_timer: Callable[[str], contextlib.AbstractContextManager[Any]] | None = None

    def __init__(
        self,
        model: nn.Module,
        lr: float | Tensor = 0.3,
        damping: float | Tensor = 0.3,
        momentum: float | Tensor = 0.9,
        weight_decay: float | Tensor = 1e-5,
        *,
        stat_decay: float | Tensor = 0.9,
        pair_decay: float | Tensor = 0.9,
        blowup_factor: float | None = 1.5,
        fallback: str = "sgd",
        fallback_lr: float = 1e-3,
        on_nonfinite: str = "skip",
        compile: bool | str = "auto",
        distributed: str = "replicate",
        process_group: Any = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            damping=damping,
            momentum=momentum,
            weight_decay=weight_decay,
            stat_decay=stat_decay,
            pair_decay=pair_decay,
        )
        super().__init__(
            model,
            defaults,
            fallback=fallback,
            fallback_lr=fallback_lr,
            on_nonfinite=on_nonfinite,
            compile=compile,
            distributed=distributed,
            process_group=process_group,
        )
        if blowup_factor is not None and (
            isinstance(blowup_factor, bool) or not isinstance(blowup_factor, (int, float)) or not blowup_factor > 1
        ):
            raise ValueError(f"blowup_factor must be a float > 1 or None (rule off), got {blowup_factor!r}")
        self.blowup_factor = None if blowup_factor is None else float(blowup_factor)
        chosen, notes = _select_layers(model)
        if not chosen:
            extra = f" ({'; '.join(notes)})" if notes else ""
            raise ValueError(
                f"{type(self).__name__}: the model has no supported layer to precondition: {type(self).__name__} "
                f"needs at least one trainable nn.Linear or nn.Conv2d (groups=1) that no other optimizer "
                f"captures{extra}"
            )
        ref = self.param_groups[0]["params"][0]
        self._sdtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
        self.capture = Capture(model, layers=chosen, dtype=self._sdtype, grad_scale="batch", mode="off")
        self._layers = [_Layer(st) for st in self.capture.layers]
        self._notes = notes
        mapping: dict[Tensor, str] = {}
        for L in self._layers:
            what = "weight+bias" if L.bias is not None else "weight"
            desc = f"{self._label} layer {L.name} ({what}, H_a {L.d_a}x{L.d_a}, H_g {self._hg_desc(L.d_g)})"
            mapping[L.weight] = desc
            if L.bias is not None:
                mapping[L.bias] = desc
        self._set_preconditioned(mapping)
        self._pass2_inputs = [L.bias if L.bias is not None else L.weight for L in self._layers]
        self._warm = False
        self._counters["rejected_steps"] = 0
        self._init_state()
        # The first step (which builds H_a = A_LM^{-1}) runs once: it stays eager rather than costing a graph.
        self._p1_first = _phase1
        self._p1 = maybe_compile(_phase1, self.compile_enabled)
        self._p2 = maybe_compile(_phase2, self.compile_enabled)
        # distributed="owner": owner rank of each layer's phase-2 work (cost ~ d_g^2 + d_a^2 per step)
        self._owners = (
            self._comm.owners([L.d_g**2 + L.d_a**2 for L in self._layers]) if self._comm is not None else []
        )

    def _phase2_keys(self) -> tuple[str, ...]:
        """State entries written by phase 2 (shared from the owner ranks with ``distributed="owner"``)."""
        hg = ("lbfgs_S", "lbfgs_Y", "lbfgs_count", "lbfgs_left", "lbfgs_right") if self._limited else ("H_g",)
        return ("H_a", *hg, "s_avg", "y_avg", "rejected_g", "rejected_a")

    # ------------------------------------------------------------------ construction helpers
    def _hg_desc(self, d_g: int) -> str:
        return f"{d_g}x{d_g}"

    def _init_state(self) -> None:
        """Create every state tensor eagerly (outside the compiled region), in the layer's weight's state."""
        for L in self._layers:
            dev = L.weight.device
            kw = dict(dtype=self._sdtype, device=dev)
            st = self.state[L.weight]
            st["grad_momentum"] = torch.zeros(L.d_g, L.d_a, **kw)
            st["A"] = torch.zeros(L.d_a, L.d_a, **kw)
            st["H_a"] = torch.eye(L.d_a, **kw)
            st["s_avg"] = torch.zeros(L.d_g, **kw)
            st["y_avg"] = torch.zeros(L.d_g, **kw)
            st["rejected_g"] = torch.zeros(1, dtype=torch.int64, device=dev)
            st["rejected_a"] = torch.zeros(1, dtype=torch.int64, device=dev)
            self._init_hg(st, L, kw)

    def _init_hg(self, st: dict[str, Any], L: _Layer, kw: dict[str, Any]) -> None:
        st["H_g"] = torch.eye(L.d_g, **kw)

    # ------------------------------------------------------------------ public API
    def describe(self) -> str:
        """The base table (every parameter and how it is updated) plus why candidate layers were left out."""
        out = super().describe()
        if self._notes:
            out += "\n  not preconditioned: " + "; ".join(self._notes)
        return out

    def counters(self) -> dict[str, int]:
        """Steps, skipped steps, and the summed per-layer counts of skipped factor updates
        (``rejected_g``: H_g BFGS updates skipped / L-BFGS pairs rejected; ``rejected_a``: H_a updates
        skipped). Reads device counters (one host sync)."""
        out = super().counters()
        for key in ("rejected_g", "rejected_a"):
            ts = [self.state[L.weight][key] for L in self._layers]
            out[key] = int(torch.stack([t.sum() for t in ts]).sum()) if ts else 0
        return out

    @torch.no_grad()
    def warm_start(self, closures: Iterable[Closure]) -> int:
        """The official initialisation pass: :math:`A` = running mean of the batch statistics
        :math:`\\frac1N\\sum_i \\bar a_i\\bar a_i^\\top` over the forward passes ``closure()`` of ``closures``
        (e.g. one per minibatch of an epoch) at the current parameters :math:`\\theta_0`.

        Only forwards are run (with grad enabled, as in the code; the returned losses are ignored). The
        mean is over all rows of all passes (the code's mean of per-batch means, equal for equal batch
        sizes). The first :meth:`step` then leaves :math:`A` unchanged and sets :math:`H_a = (A +
        \\sqrt\\lambda I)^{-1}`, :math:`H_g = I`. Must be called before the first step. Returns the number of
        passes. Raises ``FloatingPointError`` (state unchanged) if the statistic is not finite.
        """
        if self.steps > 0:
            raise RuntimeError(f"{type(self).__name__}.warm_start must be called before the first step")
        if callable(closures):
            raise TypeError("warm_start takes an iterable of closures (one forward per minibatch), not one closure")
        cap = self.capture
        cap.reset("A")
        n = 0
        with cap.mode({"A"}), torch.enable_grad(), fdist.no_sync(self.model):  # forwards only: no DDP sync
            for c in closures:
                c()
                n += 1
        self.zero_grad(set_to_none=True)
        if n == 0:
            raise ValueError("warm_start needs at least one closure")
        if self._comm is not None:
            sts = [L.stats for L in self._layers]
            self._comm.weighted_mean_([st.A for st in sts], [st.n_A for st in sts], counters=[st.n_s for st in sts])
        As = [L.stats.A for L in self._layers]
        if not self._all_finite(As):
            raise FloatingPointError(f"{type(self).__name__}.warm_start: the input statistic A is not finite")
        for L in self._layers:
            self.state[L.weight]["A"] = L.stats.A.clone()
        self._warm = True
        return n

    # ------------------------------------------------------------------ state dict
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["fastcurv"]["kbfgs"] = {"warm": self._warm}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        extra = state_dict.get("fastcurv", {}).get("kbfgs", {})
        super().load_state_dict(state_dict)
        self._warm = bool(extra.get("warm", False))

    # ------------------------------------------------------------------ step
    #: factor by which a rejected step raises the damping (Martens 2010's Levenberg-Marquardt factor 3/2)
    LM_BOOST = 1.5
    #: the damping is never raised above this: :math:`\mu_2 = \sqrt\lambda > 1` breaks the damped H_g pair
    MAX_DAMPING = 1.0

    def _reject(self) -> None:
        """A blown-up step (see ``blowup_factor``): nothing was committed (phase 1 is functional, phase 2 has
        not run, the caller restored the parameters); raise the damping and count it."""
        self._counters["rejected_steps"] += 1
        g = self.param_groups[0]
        lam = float(g["damping"])  # a rejected step is rare: one host read is fine here
        if lam < self.MAX_DAMPING:
            g["damping"].fill_(min(lam * self.LM_BOOST, self.MAX_DAMPING))
        else:  # damping at its cap: the step size is the remaining trust-region knob
            g["lr"].div_(self.LM_BOOST)

    def _hg_lists(self) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[list[Tensor]]]:
        """(Hgs, lefts, rights, mem) for the phase functions."""
        return [self.state[L.weight]["H_g"] for L in self._layers], [], [], []

    def _eval_second_pass(self, closure: Closure | None) -> Tensor:
        """The second evaluation needs only :math:`\\partial L/\\partial h` at each layer (captured by the
        tap), not the weight gradients: backpropagate to the layers' biases (a row sum each; the weight of a
        bias-free layer) so autograd skips every other weight-gradient GEMM (the code computes them all).
        A closure that calls ``backward`` itself is left alone."""
        loss, _, raw, called = self._eval_closure(closure, backward=False, fresh=True, output=True)
        if not called and raw.requires_grad:
            with torch.enable_grad():
                scaled = raw if self._scaler is None else self._scaler.scale(raw)
                torch.autograd.backward(scaled, inputs=self._pass2_inputs)
        return loss

    def _prepare_stats(self, names: tuple[str, ...], inv_scale: float) -> None:
        r"""Make the captured statistics ``names`` final: divide :math:`\bar g` by a GradScaler's scale, then,
        under data parallelism, replace them by their row-weighted means over all ranks (one all-reduce per
        dtype, :meth:`fastcurv.distributed.Communicator.weighted_mean_`)."""
        sts = [L.stats for L in self._layers]
        if inv_scale != 1.0 and "g_mean" in names:
            for st in sts:
                st.g_mean.mul_(inv_scale)
        if self._comm is None or not sts:
            return
        counter = {"A": "n_A", "a_mean": "n_a", "h_mean": "n_h", "g_mean": "n_g"}
        means = [getattr(st, n) for n in names for st in sts]
        weights = [getattr(st, counter[n]) for n in names for st in sts]
        self._comm.weighted_mean_(means, weights, counters=[st.n_s for st in sts] if "A" in names else ())

    def _layer_state(self, L: _Layer) -> list[Tensor]:
        """The floating-point state tensors of one layer."""
        return [v for v in self.state[L.weight].values() if v.is_floating_point()]

    def _repair_state(self) -> None:
        r"""After a skipped step: find layers whose state holds a non-finite value (corrupted from outside
        the step — nothing a step commits is non-finite) and re-initialise them: momentum, pair averages 0,
        :math:`A` = this batch's statistic (0 if it is not finite), :math:`H_a = (A + \sqrt\lambda I)^{-1}`,
        :math:`H_g = I` (an empty L-BFGS memory). Counted in ``state_resets``."""
        if not self._layers:
            return
        flags = torch.stack(
            [torch.stack([torch.isfinite(t).all() for t in self._layer_state(L)]).all() for L in self._layers]
        )
        bad = [L for L, ok in zip(self._layers, self._consensus(flags).tolist()) if not ok]
        if not bad:
            return
        sqrt_lam = self.param_groups[0]["damping"].sqrt()
        for L in bad:
            st = self.state[L.weight]
            kw = dict(dtype=self._sdtype, device=L.weight.device)
            A = L.stats.A if bool(torch.isfinite(L.stats.A).all()) else torch.zeros(L.d_a, L.d_a, **kw)
            st["grad_momentum"].zero_()
            st["s_avg"].zero_()
            st["y_avg"].zero_()
            st["A"] = A.clone()
            eye = torch.eye(L.d_a, **kw)
            st["H_a"] = torch.linalg.inv(st["A"] + sqrt_lam.to(A.dtype) * eye).contiguous()
            self._init_hg(st, L, kw)
            self._counters["state_resets"] += 1
        warnings.warn(
            f"{type(self).__name__}: non-finite optimizer state in layer(s) {', '.join(L.name for L in bad)} "
            f"(corrupted from outside the step); re-initialised (counted in counters()['state_resets'])",
            RuntimeWarning,
            stacklevel=6,  # the caller of opt.step (through torch.optim.Optimizer's step wrappers)
        )

    def _step(self, closure: Closure | None) -> tuple[Tensor | None, bool]:
        cap = self.capture
        params = self.param_groups[0]["params"]
        group = self.param_groups[0]
        layers = self._layers
        stt = [self.state[L.weight] for L in layers]
        first = self.steps == 0
        timer = self.phase_timer or _no_timer

        # --- pass 1 at theta_k (statistics A, a_mean, h_mean, g_mean captured)
        with timer("pass1"):
            self._snapshot_params()
            cap.reset()
            with cap.mode("a_factor+means"):
                loss = self._eval_closure(closure)
            inv_scale = self._unscale()
            self._prepare_stats(("A", "a_mean", "h_mean", "g_mean"), inv_scale)

        # --- phase 1: momentum, A, (first step: H_a), direction, theta <- theta + lr p
        Hgs, lefts, rights, mem = self._hg_lists()
        args = (
            [L.weight for L in layers],
            [L.bias for L in layers],
            [_grad_or_zero(L.weight) for L in layers],
            [_grad_or_zero(L.bias) for L in layers],
            [p.grad for p in self.fallback_params() if p.grad is not None],
            [s["grad_momentum"] for s in stt],
            [s["A"] for s in stt],
            [L.stats.A for L in layers],
            [L.stats.a_mean for L in layers],
            [L.stats.h_mean for L in layers],
            [L.stats.g_mean for L in layers],
            Hgs,
            lefts,
            rights,
            [s["H_a"] for s in stt],
            loss,
            group["lr"],
            group["damping"],
            group["momentum"],
            group["weight_decay"],
            group["stat_decay"],
        )
        phase1 = self._p1_first if first else self._p1
        with timer("phase1"):
            moms, As, Has, h1, g1, ok1 = phase1(*args, first=first, warm=self._warm, limited=self._limited)

        # --- pass 2 on the same minibatch at theta_{k+1} (means only); .grad keeps the first-pass gradients
        with timer("pass2"):
            grads1 = [p.grad for p in params]
            cap.reset("h_mean", "g_mean")
            with cap.mode("means"), fdist.no_sync(self.model):
                loss2 = self._eval_second_pass(closure)
            for p, g in zip(params, grads1):
                p.grad = g
            self._prepare_stats(("h_mean", "g_mean"), inv_scale)
        h2 = [L.stats.h_mean for L in layers]
        g2 = [L.stats.g_mean for L in layers]

        # --- one host sync: is everything finite?
        with timer("check"):
            pairs = [s[k] for s in stt for k in ("s_avg", "y_avg")]
            checks = [
                ok1,
                torch.isfinite(loss2),
                finite_flag(h2 + g2, loss2.device),
                finite_flag(pairs, loss2.device),
                finite_flag([v.reshape(1) for v in group.values() if isinstance(v, Tensor)], loss2.device),
                torch.stack([L.stats.n_A.reshape(()) > 0 for L in layers]).any(),
            ]
            # Levenberg-Marquardt guard: the step is kept unless the loss at theta_{k+1} exceeds the loss at
            # theta_k (same minibatch) by more than (blowup_factor - 1) |loss|; flag True = kept (NaN compares
            # False: caught above)
            keep = (
                ~(loss2 - loss > (self.blowup_factor - 1) * loss.abs())
                if self.blowup_factor is not None and self._comm is None  # off under data parallelism
                else torch.ones_like(ok1)
            )
            flags = self._consensus(torch.stack(checks + [keep])).tolist()
        blown = not flags.pop()
        if not flags[-1]:
            self._restore_params()
            raise ValueError(
                f"{type(self).__name__}: no layer received any rows in the first pass (an empty batch, or a forward "
                f"run under no_grad); nothing was changed"
            )
        if not all(flags):
            self._restore_params()
            self._repair_state()
            what = (
                "loss, gradient, captured statistic or direction (first pass)",
                "loss (second pass)",
                "captured statistic (second pass)",
                "optimizer state",
                "hyperparameter",
                "",
            )
            self._skip(", ".join(w for w, f in zip(what, flags) if not f))
            return loss, False
        if blown:
            self._restore_params()
            self._reject()
            return loss, False

        # --- phase 2: curvature pairs and factor updates (in place), then commit phase 1's outputs
        # with distributed="owner" each layer's pair and factor updates run on its owner rank only
        comm = self._comm if self._comm is not None and self._comm.owner_mode else None
        mine = list(range(len(layers))) if comm is None else [i for i, r in enumerate(self._owners) if r == comm.rank]

        def pick(xs: list[Any]) -> list[Any]:
            return xs if comm is None or not xs else [xs[i] for i in mine]

        with timer("phase2"):
            self._p2(
                pick(As),
                pick(Has),
                pick(Hgs),
                pick(mem),
                pick([s["s_avg"] for s in stt]),
                pick([s["y_avg"] for s in stt]),
                pick([s["rejected_g"] for s in stt]),
                pick([s["rejected_a"] for s in stt]),
                pick([L.stats.a_mean for L in layers]),
                pick(h1),
                pick(g1),
                pick(h2),
                pick(g2),
                group["damping"],
                group["pair_decay"],
                limited=self._limited,
            )
        for s, M, A, Ha in zip(stt, moms, As, Has):
            s["grad_momentum"] = M
            s["A"] = A
            s["H_a"] = Ha
        if comm is not None:
            with timer("share"):
                keys = self._phase2_keys()
                comm.share_from_owners_([s[k] for s in stt for k in keys], [r for r in self._owners for _ in keys])
        with timer("fallback"):
            self._fallback_update()
        return loss, True


class KBFGS(_KBFGSBase):
    r"""K-BFGS: Kronecker-factored preconditioner :math:`H_a\otimes H_g` with dense BFGS on both factors.

    ``KBFGS(model, lr=0.3, damping=0.3, momentum=0.9, weight_decay=1e-5)`` — the official defaults
    (``train_model``: lr α = 0.3, λ = 0.3, ρ = 0.9, τ = 1e-5). See :mod:`fastcurv.optim.kbfgs` for the
    iteration, the choices and the step protocol (``loss = opt.step(closure)``; the closure does the
    forward only and is evaluated twice on the same minibatch).

    Args:
        model: the model; every ``nn.Linear`` / ``nn.Conv2d`` (groups=1) is preconditioned, the rest goes to
            the fallback (:meth:`describe`).
        lr: step size α (0-d tensor in ``param_groups``; schedulers welcome).
        damping: λ > 0; :math:`\sqrt\lambda` is the LM damping of :math:`A` (:math:`A + \sqrt\lambda I`) and
            the :math:`\mu_2` of :math:`H_g`'s double damping.
        momentum: ρ ∈ [0, 1) of the gradient EMA (zero start, no bias correction).
        weight_decay: τ, coupled L2 on weights and biases (added to the gradient before the momentum).
        stat_decay: β ∈ [0, 1) of the EMA of :math:`A` (0.9).
        pair_decay: EMA factor ∈ [0, 1) of the :math:`H_g` pair (0.9; the code uses 0 for full-batch training).
        blowup_factor: :math:`c > 1` of the blow-up guard (default 1.5), or None (off); see the module
            docstring.
        fallback, fallback_lr, on_nonfinite, compile, distributed, process_group: see
            :class:`~fastcurv.optim._base.CurvatureOptimizer`.

    State per layer (in ``state[weight]``): ``grad_momentum`` (d_g, d_a), ``A``, ``H_a`` (d_a, d_a), ``H_g``
    (d_g, d_g), ``s_avg``, ``y_avg`` (d_g,), ``rejected_g``, ``rejected_a`` (int64 counters).
    """

    _limited = False
    _label = "K-BFGS"


class KBFGSL(_KBFGSBase):
    r"""K-BFGS(L): as :class:`KBFGS`, but :math:`H_g` is a limited-memory BFGS operator.

    ``KBFGSL(model, history=100, ...)``: the last ``history`` damped pairs (official ``Kron_BFGS_number_s_y
    = 100``), :math:`H_0 = I` (γ = 1 fixed), FIFO eviction, a pair accepted iff finite and
    :math:`\tilde s^\top\tilde y > 10^{-4}\,\tilde s^\top\tilde s\,\lVert\bar g\rVert`; applied in compact form
    (:mod:`fastcurv.optim._lbfgs`), the direction being two skinny GEMMs. :math:`H_a` stays a dense
    Hessian-action BFGS matrix. Other arguments as :class:`KBFGS`.

    State per layer: as :class:`KBFGS` without ``H_g``, plus ``lbfgs_S``, ``lbfgs_Y`` (history, d_g),
    ``lbfgs_count`` (int64 (1,)), ``lbfgs_left`` (d_g, 2·history), ``lbfgs_right`` (2·history, d_g).
    """

    _limited = True
    _label = "K-BFGS(L)"

    def __init__(self, model: nn.Module, *args: Any, history: int = 100, **kwargs: Any) -> None:
        if isinstance(history, bool) or not isinstance(history, int):
            raise TypeError(f"history must be an int (number of stored pairs), got {type(history).__name__}")
        if history < 1:
            raise ValueError(f"history must be >= 1, got {history}")
        self.history = history
        super().__init__(model, *args, **kwargs)

    def _hg_desc(self, d_g: int) -> str:
        return f"L-BFGS({self.history}) on {d_g}"

    def _init_hg(self, st: dict[str, Any], L: _Layer, kw: dict[str, Any]) -> None:
        for k, v in lbfgs_memory(self.history, L.d_g, **kw).items():
            st["lbfgs_" + k] = v

    def _hg_lists(self) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[list[Tensor]]]:
        stt = [self.state[L.weight] for L in self._layers]
        mem = [[s["lbfgs_S"], s["lbfgs_Y"], s["lbfgs_count"], s["lbfgs_left"], s["lbfgs_right"]] for s in stt]
        return [], [m[3] for m in mem], [m[4] for m in mem], mem
