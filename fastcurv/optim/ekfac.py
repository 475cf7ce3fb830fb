r"""EKFAC: K-FAC's Kronecker eigenbasis with the diagonal rescaling re-estimated from projected per-sample
gradients (George, Laurent, Bouthillier, Ballas & Vincent 2018, "Fast Approximate Natural Gradient Descent in a
Kronecker-factored Eigenbasis", arXiv 1806.03884).

Per preconditioned ``nn.Linear`` layer with homogeneous input :math:`\bar a = [a; 1]` (the bias is the last
column of :math:`\bar W = [W \mid b]`) and per-sample pre-activation gradient :math:`g = N\,\partial L/\partial h`
(the gradient of the sample's own loss for a batch-mean loss), the per-sample gradient is
:math:`\nabla_i = \sum_{t} g_{i,t}\bar a_{i,t}^\top` (one term for 2-d inputs, a sum over the positions
:math:`t` for ``(N, T, d)`` inputs). One step :math:`k = 0, 1, \dots` (counting applied steps) is:

1. factors (``stat_decay`` :math:`\beta`): :math:`A \leftarrow \beta A + (1-\beta)\,\mathbb E[\bar a\bar a^\top]`,
   :math:`G \leftarrow \beta G + (1-\beta)\,\mathbb E[gg^\top]` over the batch's rows, through
   :func:`fastcurv.ops.kron_factor_update_foreach_` (the rows themselves, one SYRK each); the first update sets
   them to the batch statistics;
2. when :math:`k \bmod T = 0` (``inv_every`` :math:`T`): the eigenbases :math:`U_A, U_G` of the factors
   (``eigh``);
3. the diagonal in that basis: :math:`S_b = \frac1N\sum_i (U_G^\top\nabla_i U_A)^{\odot 2}` (for 2-d inputs
   :math:`= \frac1N (U^{\odot 2})^\top V^{\odot 2}` with rows :math:`U = g U_G`, :math:`V = \bar a U_A`), and
   :math:`S \leftarrow \beta_s S + (1-\beta_s) S_b` (``scale_decay`` :math:`\beta_s`); at step 0 and whenever the
   basis was refreshed :math:`S = S_b` (the old diagonal belongs to the old basis; the paper recomputes
   :math:`s^*` after each eigendecomposition);
4. gradient with L2 (``weight_decay`` :math:`\tau`): :math:`\hat g = \nabla_{\bar W}L + \tau\bar W`; momentum in
   EMA form (``momentum`` :math:`\rho`, as fastcurv's K-FAC): :math:`M \leftarrow \rho M + (1-\rho)\hat g`;
5. :math:`P = U_G\,[(U_G^\top M U_A) \oslash (S + \lambda)]\,U_A^\top` (``damping`` :math:`\lambda`) and
   :math:`\bar W \leftarrow \bar W - \eta P`.

On a single-sample batch :math:`S_b` is exactly the squared projected gradient, the EKFAC diagonal's defining
property (tests/optim/test_ekfac.py checks it against autograd).

The per-sample rows come from forward hooks on the layers (the input rows) and tensor hooks on their outputs
(the output gradients), kept for one step: :class:`fastcurv.capture.Capture` accumulates only the batch means
:math:`A, G`, and EKFAC's diagonal needs the rows. The same rows feed the factor update, so no capture is
attached. Rows of several grad-enabled forwards before one step (gradient accumulation in the plain loop)
are concatenated; each call's :math:`g` is scaled by its own batch size, as in the capture.

Deviations from the paper: the paper's experiments use the amortised schedule with separate periods for the
basis and for :math:`s^*`; here :math:`S` is an EMA updated every step (its ``scale_decay`` = 0 gives the
paper's per-batch re-estimate). Momentum is on the gradient before preconditioning (fastcurv's K-FAC rule).
Convolutions (and everything else) go to the base class's fallback: their per-sample projected gradients need
a ``(N, d_g, d_a)`` tensor per layer, not implemented. No GradScaler and no data parallelism yet.

Defaults: ``lr=0.3``, ``damping=3``, ``momentum=0.9``, ``weight_decay=0``, ``stat_decay=0.95``,
``scale_decay=0.95``, ``inv_every=10``. Measured on the generated CURVES autoencoder (batch 1000, 40 steps,
evaluated loss on 2000 training images): damping 0.1 diverges within 3 steps at lr 0.3 and 1; lr 0.3 with damping
1 or 3 and lr 1 with damping 10 stall on the plateau near 163 (lr 1 / damping 3 diverges), where SOAP is at 143
after 50 steps — the natural-gradient scaling :math:`1/S` does not escape that plateau like Adam's
:math:`1/\sqrt v` does (``SOAP(model, factors="kfac")`` is Adam in this same eigenbasis).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastcurv import ops
from fastcurv.optim._base import Closure, CurvatureOptimizer
from fastcurv.optim._linalg import eigvecs as _eigvecs

__all__ = ["EKFAC"]


@dataclass
class _Layer:
    module: nn.Linear
    name: str
    d_a: int
    d_g: int
    a_rows: list[Tensor] = field(default_factory=list)  # (N, T, d_a) per call
    g_rows: list[Tensor] = field(default_factory=list)  # (N, T, d_g) per call, scaled by N
    handle: Any = None


class EKFAC(CurvatureOptimizer):
    r"""EKFAC for ``nn.Linear`` layers (see the module docstring for the exact algorithm).

    Usage::

        opt = EKFAC(model, lr=0.3, damping=3.0)
        opt.step(lambda: loss_fn(model(x), y))          # or: loss.backward(); opt.step()

    Args:
        model: the model; its ``nn.Linear`` layers (trainable weight and bias) are preconditioned.
        lr: :math:`\eta`. damping: :math:`\lambda > 0` added to the diagonal. momentum: :math:`\rho \in [0, 1)`.
        weight_decay: L2 :math:`\tau`. stat_decay: factor EMA :math:`\beta`. scale_decay: diagonal EMA
            :math:`\beta_s`. inv_every: eigenbasis period :math:`T \ge 1`.
        factor_dtype: dtype of factors, bases, diagonal and momentum (default: the parameters', float32 for
            low precision).
        fallback, fallback_lr, on_nonfinite, compile: see :class:`~fastcurv.optim._base.CurvatureOptimizer`.
    """

    hyperparameters = {
        "lr": (0.0, None),
        "damping": (0.0, None),
        "momentum": (0.0, 1.0),
        "weight_decay": (0.0, None),
        "stat_decay": (0.0, 1.0),
        "scale_decay": (0.0, 1.0),
    }

    def __init__(
        self,
        model: nn.Module,
        lr: float | Tensor = 0.3,
        damping: float | Tensor = 3.0,
        momentum: float | Tensor = 0.9,
        weight_decay: float | Tensor = 0.0,
        stat_decay: float | Tensor = 0.95,
        scale_decay: float | Tensor = 0.95,
        inv_every: int = 10,
        *,
        factor_dtype: torch.dtype | None = None,
        fallback: str = "sgd",
        fallback_lr: float = 1e-3,
        on_nonfinite: str = "skip",
        compile: bool | str = "auto",
    ) -> None:
        if isinstance(inv_every, bool) or not isinstance(inv_every, int) or inv_every < 1:
            raise ValueError(f"inv_every must be an int >= 1, got {inv_every!r}")
        defaults: dict[str, float | Tensor] = dict(
            lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay, stat_decay=stat_decay,
            scale_decay=scale_decay,
        )
        super().__init__(model, defaults, fallback=fallback, fallback_lr=fallback_lr, on_nonfinite=on_nonfinite,
                         compile=compile)
        g = self.param_groups[0]
        if float(g["momentum"]) >= 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {float(g['momentum'])}")
        if float(g["damping"]) <= 0.0:
            raise ValueError(
                f"damping must be > 0 (it bounds the step where the diagonal is 0), got {float(g['damping'])}"
            )
        params = g["params"]
        if factor_dtype is None:
            factor_dtype = params[0].dtype if params[0].dtype in (torch.float32, torch.float64) else torch.float32
        if factor_dtype not in (torch.float32, torch.float64):
            raise TypeError(f"factor_dtype must be torch.float32 or torch.float64, got {factor_dtype}")
        self.factor_dtype = factor_dtype
        self.inv_every = inv_every
        trainable = set(params)
        self._layers: list[_Layer] = []
        for name, m in model.named_modules():
            if not isinstance(m, nn.Linear) or type(m).forward is not nn.Linear.forward:
                continue
            if m.weight not in trainable or (m.bias is not None and m.bias not in trainable):
                continue
            lay = _Layer(m, name or "<root>", m.in_features + int(m.bias is not None), m.out_features)
            lay.handle = m.register_forward_hook(self._make_hook(lay))
            self._layers.append(lay)
        mapping: dict[Tensor, str] = {}
        for lay in self._layers:
            mapping[lay.module.weight] = f"EKFAC Linear {lay.name} (weight+bias)"
            if lay.module.bias is not None:
                mapping[lay.module.bias] = f"EKFAC Linear {lay.name} (bias column)"
            self._init_layer_state(lay)
        self._set_preconditioned(mapping)
        self._counters.update(basis_refreshes=0, basis_failures=0)
        self._zero = torch.zeros((), dtype=factor_dtype, device=params[0].device)

    # ------------------------------------------------------------------------------------------ rows
    def _make_hook(self, lay: _Layer):  # type: ignore[no-untyped-def]
        def hook(mod: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> None:
            if not (torch.is_grad_enabled() and isinstance(out, Tensor) and out.requires_grad):
                return
            x = inputs[0].detach()
            n = x.shape[0] if x.dim() > 1 else 1
            a = x.reshape(n, -1, x.shape[-1]).to(self.factor_dtype)
            if lay.module.bias is not None:
                a = F.pad(a, (0, 1), value=1.0)
            lay.a_rows.append(a)

            def grad_hook(gr: Tensor) -> None:
                lay.g_rows.append((gr.detach().reshape(n, -1, gr.shape[-1]) * n).to(self.factor_dtype))

            out.register_hook(grad_hook)

        return hook

    def _clear_rows(self) -> None:
        for lay in self._layers:
            lay.a_rows.clear()
            lay.g_rows.clear()

    def _init_layer_state(self, lay: _Layer) -> None:
        dev, dt = lay.module.weight.device, self.factor_dtype
        s = self.state[lay.module.weight]
        s["A"] = torch.zeros(lay.d_a, lay.d_a, dtype=dt, device=dev)
        s["G"] = torch.zeros(lay.d_g, lay.d_g, dtype=dt, device=dev)
        s["UA"] = torch.eye(lay.d_a, dtype=dt, device=dev)
        s["UG"] = torch.eye(lay.d_g, dtype=dt, device=dev)
        s["scale"] = torch.zeros(lay.d_g, lay.d_a, dtype=dt, device=dev)
        s["momentum"] = torch.zeros(lay.d_g, lay.d_a, dtype=dt, device=dev)

    # ------------------------------------------------------------------------------------------ pieces
    @staticmethod
    def _projected_second_moment(a: Tensor, g: Tensor, UA: Tensor, UG: Tensor) -> Tensor:
        r""":math:`\frac1N\sum_i (U_G^\top \nabla_i U_A)^{\odot 2}` with
        :math:`\nabla_i = \sum_t g_{it}\bar a_{it}^\top`."""
        n = a.shape[0]
        u = g @ UG  # (N, T, d_g)
        v = a @ UA  # (N, T, d_a)
        if a.shape[1] == 1:
            return (u[:, 0] ** 2).T @ (v[:, 0] ** 2) / n
        per = torch.einsum("ntg,nta->nga", u, v)
        return (per * per).mean(0)

    def _hom_grad(self, lay: _Layer, wd: Tensor) -> Tensor:
        m = lay.module
        gw = m.weight.grad if m.weight.grad is not None else torch.zeros_like(m.weight)
        gw = (gw + m.weight * wd).to(self.factor_dtype)
        if m.bias is None:
            return gw
        gb = m.bias.grad if m.bias.grad is not None else torch.zeros_like(m.bias)
        gb = (gb + m.bias * wd).to(self.factor_dtype)
        return torch.cat([gw, gb.unsqueeze(1)], dim=1)

    # ------------------------------------------------------------------------------------------ step
    def _step(self, closure: Closure | None) -> tuple[Tensor | None, bool]:
        if closure is not None:
            self._clear_rows()
            loss: Tensor | None = self._eval_closure(closure)
        else:
            loss = None
            if not any(p.grad is not None for p in self.param_groups[0]["params"]):
                raise ValueError(
                    "EKFAC.step() without a closure needs gradients: call loss.backward() first, or pass a closure "
                    "(step(lambda: loss_fn(model(x), y)))"
                )
        try:
            return self._update(loss)
        finally:
            self._clear_rows()

    def _update(self, loss: Tensor | None) -> tuple[Tensor | None, bool]:
        layers = [lay for lay in self._layers if lay.a_rows and len(lay.g_rows) == len(lay.a_rows)]
        missing = [lay.name for lay in self._layers if lay not in layers and lay.module.weight.grad is not None]
        if missing:
            raise ValueError(
                f"EKFAC: layers {missing} have gradients but no recorded rows (a forward under no_grad, or the "
                f"weight used without calling the layer's forward); nothing was changed"
            )
        a_all = [torch.cat([r.reshape(-1, r.shape[1], r.shape[2]) for r in lay.a_rows]) for lay in layers]
        g_all = [torch.cat(lay.g_rows) for lay in layers]
        check: list[Tensor | None] = [p.grad for p in self.param_groups[0]["params"]] + a_all + g_all
        if loss is not None:
            check.append(loss.reshape(1))
        if not self._all_finite(check):
            self._skip("loss, gradient or per-sample rows")
            return loss, False
        g = self.param_groups[0]
        first = self._counters["steps"] == 0
        refresh = self._counters["steps"] % self.inv_every == 0
        st = [self.state[lay.module.weight] for lay in layers]
        if layers:
            beta = self._zero if first else g["stat_decay"]
            ops.kron_factor_update_foreach_(
                [s["A"] for s in st] + [s["G"] for s in st],
                [a.reshape(-1, a.shape[-1]) for a in a_all] + [x.reshape(-1, x.shape[-1]) for x in g_all],
                beta,
            )
        for lay, s, a, gr in zip(layers, st, a_all, g_all):
            if refresh:
                UA, UG = _eigvecs(s["A"]), _eigvecs(s["G"])
                if UA is None or UG is None or not self._all_finite([UA, UG]):
                    self._counters["basis_failures"] += 1
                else:
                    s["UA"].copy_(UA)
                    s["UG"].copy_(UG)
                    self._counters["basis_refreshes"] += 1
            Sb = self._projected_second_moment(a, gr, s["UA"], s["UG"])
            if first or refresh:
                s["scale"].copy_(Sb)
            else:
                bs = g["scale_decay"].to(Sb.dtype)
                s["scale"].mul_(bs).add_(Sb * (1 - bs))
            mom = g["momentum"].to(Sb.dtype)
            s["momentum"].mul_(mom).add_(self._hom_grad(lay, g["weight_decay"]) * (1 - mom))
            UA, UG = s["UA"], s["UG"]
            P = UG @ (((UG.T @ s["momentum"]) @ UA) / (s["scale"] + g["damping"].to(Sb.dtype))) @ UA.T
            P = P * (-g["lr"]).to(P.dtype)
            W, b = lay.module.weight, lay.module.bias
            k = W.shape[1]
            W.add_(P[:, :k].to(W.dtype))
            if b is not None:
                b.add_(P[:, k].to(b.dtype))
        self._fallback_update()
        return loss, True

    def remove(self) -> None:
        """Detach the hooks from the model (the optimizer is unusable after)."""
        for lay in self._layers:
            if lay.handle is not None:
                lay.handle.remove()
                lay.handle = None

    def __repr__(self) -> str:
        g = self.param_groups[0]
        hp = ", ".join(f"{k}={float(g[k]):g}" for k in self.hyperparameters if k in g)
        return f"EKFAC({hp}, inv_every={self.inv_every}, {len(self._layers)} layers)"
