r"""Per-layer curvature statistics captured during forward/backward, in a form that survives ``torch.compile``.

For every supported layer (``nn.Linear``, ``nn.Conv2d`` with ``groups=1``) :class:`Capture` accumulates, over
all calls of the current step (until :meth:`Capture.reset`), the statistics K-FAC and K-BFGS need
(docs/algorithms.md §1.1-1.2, §1.7). With rows :math:`i = 1..n` pooled over every call of the layer:

* :math:`\bar a_i = [a_i; 1]` when the layer has a bias (homogeneous coordinate; no extra coordinate
  without bias), :math:`d_a = \dim \bar a`;
* :math:`h_i` the pre-activation output rows, :math:`d_g = \dim h`;
* :math:`g_i = c\,\partial L/\partial h_i` with ``grad_scale`` :math:`c` = the number of samples :math:`N`
  of that forward call (``x.shape[0]``; the loss is a batch mean, so :math:`N\,\partial L/\partial h_i` is
  the per-sample gradient — the K-BFGS code's ``a_grad``), or a fixed float;

.. math::
    A = \frac1n\sum_i \bar a_i\bar a_i^\top,\quad G = \frac1n\sum_i g_i g_i^\top,\quad
    \bar a = \frac1n\sum_i \bar a_i,\quad \bar h = \frac1n\sum_i h_i,\quad \bar g = \frac1n\sum_i g_i .

Rows. ``nn.Linear``: :math:`a` = the input reshaped to ``(-1, in_features)``, :math:`h`, :math:`g` =
``(-1, out_features)``. ``nn.Conv2d`` (K-FAC for convolutions, Grosse & Martens 2016, "KFC"): :math:`a` =
the ``F.unfold`` patches of the (padded) input, one row per sample and output position, ``(N·L,
C_in·kh·kw)`` with columns ordered like ``weight.flatten(1)`` (channel-major, then kernel row, column);
:math:`h`, :math:`g` = ``(N·L, C_out)``, L = H_out·W_out. So :math:`h_i = \bar W \bar a_i` with
:math:`\bar W = [W\text{.flatten}(1) \mid b]` for both kinds (:meth:`LayerStats.grad_matrix` gives the
gradient in this layout). :math:`A` and :math:`G` are plain means over all N·L rows. KFC's Fisher
block is :math:`L\,(A\otimes G)`; kfac-pytorch stores :math:`A/L` and :math:`L^2 G` (same product). The
factor L is not applied here: it is ``n_A / n_s`` (rows per sample), left to the optimizer.

Mechanism (docs/capture.md, "R"). The class of every captured module is swapped to a subclass (parameters,
buffers and ``state_dict`` unchanged; ``type(m)`` changes, ``isinstance(m, nn.Linear)`` still holds) whose
``forward``, when ``torch.is_grad_enabled()`` and the output requires grad, accumulates the forward-side
statistics (:math:`A`, :math:`\bar a`, :math:`\bar h`) and wraps the output in an identity
``autograd.Function`` whose backward accumulates the backward-side ones (:math:`G`, :math:`\bar g`). All
buffers have fixed sizes (d×d, d), so the batch size may vary; every call *accumulates* (a running mean,
exact for the concatenation of all rows), so a module called twice per forward (weight sharing) gets the
statistics of the concatenated rows. Buffers are kept on ``ctx`` attributes, not ``save_for_backward``
(docs/capture.md pitfall 5). ``no_grad``/``inference_mode`` forwards never touch statistics.

Factors go through :func:`fastcurv.ops.kron_factor_update_` (SYRK, one opaque op under compile): after
:math:`n` rows, a call with :math:`m` rows :math:`X` runs it with :math:`\beta = n/(n+m)`, which is
exactly the running mean :math:`A \leftarrow (nA + X^\top X)/(n+m)`. In eager mode on the CPU the factor
rows of ``nn.Linear`` layers are not reduced at once: they are kept (the padded/scaled copy that is made
anyway) and reduced when a factor is first read (``stats.A``/``stats.G``), all layers' pending rows in
**one** :func:`fastcurv.ops.kron_factor_update_foreach_` call per rows dtype (rows of several calls of one layer are
concatenated, exact for the running mean), saving one op dispatch per layer and pass; the means' row sums
are likewise folded in by one foreach division. Counters are updated at once. On CUDA, under ``torch.compile``, and for ``Conv2d`` (large patch matrices) the update runs in the
call. Means use
``mean.mul_(n).add_(Σrows).div_(n+m)``. Counters are int64 tensors of shape ``(1,)``.

Inductor pitfalls avoided (docs/capture.md; regression tests in tests/test_capture.py): no ``add(..., alpha=)``
(inductor's addmm pattern drops ``alpha``, pitfall 3) and no in-place update of a 0-d float64 tensor in
compiled code (lost by ``tensorify_python_scalars``, pitfall 4): counters are int64 of shape (1,) and
the 0-d ``beta`` is a fresh value, never mutated.

Modes. What is accumulated is a set of statistic names from :data:`STATS` (``"A"``, ``"a_mean"``,
``"h_mean"``, ``"G"``, ``"g_mean"``); :class:`Mode` names the useful presets:

=====================  =====================================  =====================================
mode                   accumulates                            use
=====================  =====================================  =====================================
``"factors"``          A, G, a_mean, h_mean, g_mean           K-FAC
``"a_factor+means"``   A, a_mean, h_mean, g_mean              K-BFGS first pass (at θ)
``"means"``            h_mean, g_mean                         K-BFGS second pass (θ+αp, same batch)
``"off"``              nothing                                HVP passes, evaluation
=====================  =====================================  =====================================

The mode in force at a forward call decides what that call's backward accumulates. Under
``torch.compile`` the mode is a Python attribute guarded by dynamo: the first call in each new mode
costs one recompile (no graph break; ``fullgraph=True`` works), later switches reuse the cached graphs
(mind ``torch._dynamo.config.recompile_limit``, default 8: modes × grad mode × dynamic shapes).

Autograd. A captured output is a detached alias of the layer output returned by the tap, so in-place ops
on it (``ReLU(inplace=True)``) are fine and parameter gradients are unchanged. The tap defines no ``jvp``
and no ``setup_context`` (dynamo would graph-break on a custom ``jvp``): run forward-mode AD and
``torch.func`` transforms through a captured model under :meth:`Capture.paused` (no tap is applied there).
Every backward that flows through a tapped forward accumulates again: a second backward through the
same graph (``retain_graph=True``, or a double-backward HVP, whose gradient graph runs back through the
forward) would add its cotangents to G and g_mean, so run HVP passes on a forward made in ``"off"`` mode.
Activation checkpointing re-runs forwards with grad enabled, so forward statistics would be counted
twice: pause it there.

Not covered (listed by :meth:`Capture.unsupported_params` for the optimizers' fallback): other layer
types, ``Conv2d`` with ``groups > 1``, and modules whose weights are used without calling their
``forward`` (e.g. ``nn.MultiheadAttention.out_proj``) — the latter are not detectable, and their counters
stay 0. Buffers are allocated on the module's device; :meth:`Capture.reset` re-allocates them if the
module moved. A ``copy.deepcopy`` of a captured model gets independent statistics not listed in
``cap.layers``; a new Capture on it (or on the original model) takes its layers over (:class:`Capture`).
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastcurv import ops

__all__ = [
    "Capture", "LayerStats", "Mode", "STATS", "CapturedLinear", "CapturedConv2d", "is_captured", "base_type",
]

STATS: tuple[str, ...] = ("A", "a_mean", "h_mean", "G", "g_mean")
"""Names of the statistics, in the order of the internal flag tuple."""

_COUNTER = {"A": "n_A", "a_mean": "n_a", "h_mean": "n_h", "G": "n_G", "g_mean": "n_g"}


class Mode(str, enum.Enum):
    """Named sets of statistics to accumulate (see the module docstring's table)."""

    FACTORS = "factors"
    A_FACTOR_MEANS = "a_factor+means"
    MEANS = "means"
    OFF = "off"


_MODE_STATS: dict[Mode, frozenset[str]] = {
    Mode.FACTORS: frozenset(STATS),
    Mode.A_FACTOR_MEANS: frozenset({"A", "a_mean", "h_mean", "g_mean"}),
    Mode.MEANS: frozenset({"h_mean", "g_mean"}),
    Mode.OFF: frozenset(),
}


def _stat_set(mode: Mode | str | Iterable[str]) -> frozenset[str]:
    if isinstance(mode, str):
        try:
            return _MODE_STATS[Mode(mode)]
        except ValueError:
            raise ValueError(
                f"mode must be one of {[m.value for m in Mode]} or an iterable of names from {STATS}, got {mode!r}"
            ) from None
    names = frozenset(mode)
    bad = sorted(n for n in names if n not in STATS)
    if bad or not all(isinstance(n, str) for n in names):
        raise ValueError(f"unknown statistic name(s) {bad}; valid names: {STATS}")
    return names


# --------------------------------------------------------------------------------------------------------
# accumulation primitives (the patterns pinned by the inductor regression tests)
# --------------------------------------------------------------------------------------------------------
def _factor_update_(F_: Tensor, n: Tensor, rows: Tensor) -> None:
    r"""Running mean of a Kronecker factor: :math:`F \leftarrow (nF + X^\top X)/(n+m)`, :math:`n \leftarrow n+m`.

    Done by :func:`fastcurv.ops.kron_factor_update_` with :math:`\beta = n/(n+m)` (a fresh 0-d tensor),
    so the SYRK op does the work; ``n`` is an int64 counter of shape ``(1,)``.
    """
    m = rows.shape[0]
    beta = (n.to(F_.dtype) / (n + m).to(F_.dtype)).reshape(())
    ops.kron_factor_update_(F_, rows, beta)
    n.add_(m)


def _mean_update_(mean: Tensor, n: Tensor, rowsum: Tensor, m: int) -> None:
    r"""Running mean of rows given their sum:
    :math:`\mu \leftarrow (n\mu + \sum_i x_i)/(n+m)`, :math:`n \leftarrow n+m`.

    No ``alpha=`` (docs/capture.md pitfall 3); ``n`` is an int64 counter of shape ``(1,)`` (pitfall 4).
    """
    mean.mul_(n.to(mean.dtype)).add_(rowsum).div_((n + m).to(mean.dtype))
    n.add_(m)


def _rows_dtype(t: Tensor, stats_dtype: torch.dtype, *, scaled: bool) -> Tensor:
    """Cast rows for the factor op: kept as bf16 (and fp16 when not scaled) for float32 statistics (the op
    accumulates in float32), otherwise converted to the statistics dtype."""
    if t.dtype == stats_dtype:
        return t
    if stats_dtype == torch.float32 and (t.dtype == torch.bfloat16 or (t.dtype == torch.float16 and not scaled)):
        return t
    return t.to(stats_dtype)


def _conv_patches(mod: nn.Conv2d, x: Tensor) -> Tensor:
    """``F.unfold`` patches of a Conv2d input as rows ``(N·L, C_in·kh·kw)`` (columns like ``weight.flatten(1)``).

    Non-zero padding modes and string paddings (``"same"``, ``"valid"``) pad explicitly first, exactly as
    ``nn.Conv2d`` does (``_reversed_padding_repeated_twice``), then unfold with no padding.
    """
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
        pmode = "constant" if mod.padding_mode == "zeros" else mod.padding_mode
        x = F.pad(x, mod._reversed_padding_repeated_twice, mode=pmode)
        padding: int | tuple[int, ...] = 0
    else:
        padding = mod.padding
    cols = F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=padding, stride=mod.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _out_rows(t: Tensor, conv: bool) -> Tensor:
    """Rows ``(-1, d_g)`` of a layer output (or of its gradient): channels last for Conv2d."""
    if conv:
        return t.movedim(-3, -1).reshape(-1, t.shape[-3])
    return t.reshape(-1, t.shape[-1])


def _out_rowsum(t: Tensor, conv: bool, dtype: torch.dtype) -> Tensor:
    """Sum over rows of a layer output (or its gradient), without forming the rows."""
    if conv:
        dims = (0, 2, 3) if t.dim() == 4 else (1, 2)
        return t.sum(dim=dims, dtype=dtype)
    return t.reshape(-1, t.shape[-1]).sum(0, dtype=dtype)


def _num_samples(t: Tensor, conv: bool) -> int:
    """N of a call: the leading dimension of a batched input/output, 1 when unbatched."""
    batched = t.dim() == 4 if conv else t.dim() > 1
    return t.shape[0] if batched else 1


class _GTap(torch.autograd.Function):
    r"""Identity on the layer output :math:`h`; the backward accumulates :math:`G` and :math:`\bar g` of
    :math:`g = c\,\partial L/\partial h` into fixed-size buffers kept on ``ctx`` (not saved tensors)."""

    @staticmethod
    def forward(  # type: ignore[no-untyped-def]
        ctx, h, G, g_mean, n_G, n_g, do_G: bool, do_g: bool, conv: bool, scale: float | None
    ):
        ctx.bufs = (G, g_mean, n_G, n_g)
        ctx.cfg = (do_G, do_g, conv, scale)
        # A detached alias, not a view: an in-place op on the output (ReLU(inplace=True)) stays legal
        # (views returned by a custom Function may not be modified in place), and nothing saves h.
        return h.detach()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        G, g_mean, n_G, n_g = ctx.bufs
        do_G, do_g, conv, scale = ctx.cfg
        g = grad.detach()
        c = _num_samples(g, conv) if scale is None else scale
        if do_G:
            rows = _rows_dtype(_out_rows(g, conv), G.dtype, scaled=True) * c
            if rows.shape[0] > 0:
                state = getattr(G, "_fastcurv_state", None)
                if state is None:
                    _factor_update_(G, n_G, rows)
                else:
                    _factor_rows_(state, G, n_G, rows, not conv)
        if do_g:
            m = g.numel() // g_mean.shape[0]
            if m > 0:
                _mean_rows_(getattr(G, "_fastcurv_state", None), g_mean, n_g, _out_rowsum(g, conv, g_mean.dtype) * c, m)
        return grad, None, None, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------------------
# per-layer state and the swapped classes
# --------------------------------------------------------------------------------------------------------
class _State:
    """State shared by all layers of one :class:`Capture`; its attributes are what dynamo guards on."""

    def __init__(self, stats: frozenset[str], grad_scale: float | None) -> None:
        self.flags: tuple[bool, ...] = tuple(s in stats for s in STATS)
        self.grad_scale = grad_scale
        #: (factor, counter, rows) not yet reduced, in call order (eager ``nn.Linear`` only; see flush)
        self.pending: list[tuple[Tensor, Tensor, Tensor]] = []
        #: (mean, counter, row sum, rows) not yet folded in (same rule)
        self.pending_means: list[tuple[Tensor, Tensor, Tensor, int]] = []

    def flush(self) -> None:
        """Reduce every pending factor update: the rows of each factor since the last flush (concatenated
        if there were several calls), with beta = n_before / n (exact running mean). The factors whose
        beta is 0 (the usual case: first accumulation after a reset) go through one foreach call; any other
        gets its own call. The counters are read on the host: pending rows exist only for CPU tensors, where
        that read costs no device synchronisation."""
        pend, self.pending = self.pending, []
        pend_m, self.pending_means = self.pending_means, []
        rows: dict[int, tuple[Tensor, Tensor, list[Tensor]]] = {}
        for F_, n, X in pend:
            rows.setdefault(id(F_), (F_, n, []))[2].append(X)
        entries = list(rows.values())
        sums: dict[int, tuple[Tensor, Tensor, list[Tensor], list[int]]] = {}
        for mu, n, rs, m in pend_m:
            e = sums.setdefault(id(mu), (mu, n, [], []))
            e[2].append(rs)
            e[3].append(m)
        mean_entries = list(sums.values())
        counters = [n for _, n, _ in entries] + [n for _, n, _, _ in mean_entries]
        if not counters:
            return
        read = torch.cat(counters).tolist()
        totals, mean_totals = read[: len(entries)], read[len(entries) :]
        fresh_mu: list[Tensor] = []
        fresh_rs: list[Tensor] = []
        fresh_m: list[float] = []
        for (mu, _, rss, ms), n_now in zip(mean_entries, mean_totals):
            rs = rss[0] if len(rss) == 1 else torch.stack(rss).sum(0)
            before = n_now - sum(ms)
            if before == 0:  # 0 * mean + rowsum, divided: the immediate update's arithmetic, bitwise
                fresh_mu.append(mu)
                fresh_rs.append(rs)
                fresh_m.append(float(n_now))
            else:
                mu.mul_(float(before)).add_(rs).div_(float(n_now))
        if fresh_mu:
            torch._foreach_copy_(fresh_mu, torch._foreach_div(fresh_rs, fresh_m))
        fresh: dict[tuple[torch.dtype, torch.dtype, torch.device], tuple[list[Tensor], list[Tensor]]] = {}
        for (F_, _, xs), n_now in zip(entries, totals):
            X = xs[0] if len(xs) == 1 else torch.cat([x.to(xs[0].dtype) for x in xs])
            before = n_now - X.shape[0]
            if before == 0:  # the op takes one dtype for all factors and one for all rows: group by them
                group = fresh.setdefault((F_.dtype, X.dtype, X.device), ([], []))
                group[0].append(F_)
                group[1].append(X)
            else:
                ops.kron_factor_update_(F_, X, before / n_now)
        for Fs, Xs in fresh.values():
            ops.kron_factor_update_foreach_(Fs, Xs, 0.0)


#: devices on which factor rows are deferred to one foreach update per flush (eager mode); on CUDA the
#: flush's counter read would be a device synchronisation, and a captured or compiled step has no dispatch
#: overhead to save
_DEFER_DEVICES: tuple[str, ...] = ("cpu",)


def _deferrable(rows: Tensor) -> bool:
    """Eager, plain tensors on a :data:`_DEFER_DEVICES` device only (never while dynamo/AOT trace: fake or
    functional tensors)."""
    return type(rows) is torch.Tensor and rows.device.type in _DEFER_DEVICES and not torch.compiler.is_compiling()


def _mean_rows_(state: _State | None, mean: Tensor, n: Tensor, rowsum: Tensor, m: int) -> None:
    """:func:`_mean_update_`, deferred to :meth:`_State.flush` when possible (``state`` given, eager CPU)."""
    if state is not None and _deferrable(rowsum):
        state.pending_means.append((mean, n, rowsum, m))
        n.add_(m)
        return
    if state is not None and (state.pending or state.pending_means):
        state.flush()
    _mean_update_(mean, n, rowsum, m)


def _factor_rows_(state: _State, F_: Tensor, n: Tensor, rows: Tensor, defer: bool) -> None:
    """Accumulate ``rows`` into the factor ``F_``: deferred to :meth:`_State.flush` when possible."""
    if defer and _deferrable(rows):
        state.pending.append((F_, n, rows))
        n.add_(rows.shape[0])
        return
    if state.pending or state.pending_means:
        state.flush()
    _factor_update_(F_, n, rows)


class LayerStats:
    r"""Statistics of one captured layer for the current step (see the module docstring for the math).

    Attributes
    ----------
    module, name, kind (``"linear"`` / ``"conv2d"``), has_bias, d_a, d_g
        The layer; ``d_a`` includes the homogeneous coordinate when ``has_bias``.
    A : (d_a, d_a), G : (d_g, d_g)
        Running row means of :math:`\bar a\bar a^\top` and :math:`g g^\top`.
    a_mean : (d_a,), h_mean : (d_g,), g_mean : (d_g,)
        Row means of :math:`\bar a` (last entry 1 with a bias), :math:`h`, :math:`g`.
    n_A, n_a, n_h, n_G, n_g : int64 (1,)
        Rows accumulated into A, a_mean, h_mean, G, g_mean (``n_a``/``n_g`` are the counts of the means).
    n_s : int64 (1,)
        Samples (sum of N over the calls) accumulated with A; rows per sample (L for Conv2d) = n_A / n_s.
    """

    def __init__(self, module: nn.Module, name: str, state: _State, dtype: torch.dtype) -> None:
        conv = isinstance(module, nn.Conv2d)
        self.module = module
        self.name = name
        self.kind = "conv2d" if conv else "linear"
        self.has_bias = module.bias is not None
        d_in = module.weight[0].numel()  # in_features, or C_in·kh·kw
        self.d_a = d_in + int(self.has_bias)
        self.d_g = module.weight.shape[0]
        self.dtype = dtype
        self._state = state
        self._alloc(module.weight.device)

    def _alloc(self, device: torch.device) -> None:
        kw = dict(dtype=self.dtype, device=device)
        self._A = torch.zeros(self.d_a, self.d_a, **kw)
        self._G = torch.zeros(self.d_g, self.d_g, **kw)
        self._G._fastcurv_state = self._state  # type: ignore[attr-defined]  # for the tap's backward
        self._a_mean = torch.zeros(self.d_a, **kw)
        self._h_mean = torch.zeros(self.d_g, **kw)
        self._g_mean = torch.zeros(self.d_g, **kw)
        for c in ("n_A", "n_a", "n_h", "n_G", "n_g", "n_s"):
            setattr(self, c, torch.zeros(1, dtype=torch.int64, device=device))

    @property
    def conv(self) -> bool:
        return self.kind == "conv2d"

    def _flushed(self, t: Tensor) -> Tensor:
        st = self._state
        if st.pending or st.pending_means:
            st.flush()
        return t

    @property
    def A(self) -> Tensor:
        """:math:`A` (reducing any pending rows of every layer first, see the module docstring)."""
        return self._flushed(self._A)

    @property
    def G(self) -> Tensor:
        """:math:`G` (reducing any pending rows of every layer first)."""
        return self._flushed(self._G)

    @property
    def a_mean(self) -> Tensor:
        return self._flushed(self._a_mean)

    @property
    def h_mean(self) -> Tensor:
        return self._flushed(self._h_mean)

    @property
    def g_mean(self) -> Tensor:
        return self._flushed(self._g_mean)

    def tensors(self, names: Iterable[str] = STATS) -> list[Tensor]:
        """The buffers named in ``names`` and their counters (``n_s`` goes with ``"A"``)."""
        out: list[Tensor] = []
        for s in names:
            out += [getattr(self, s), getattr(self, _COUNTER[s])]
            if s == "A":
                out.append(self.n_s)
        return out

    def grad_matrix(self) -> Tensor | None:
        r""":math:`[\nabla W\text{.flatten}(1) \mid \nabla b]` of shape ``(d_g, d_a)``, in the layout of
        :math:`A` and :math:`G` (so the K-FAC direction is :math:`G^{-1}\,\hat G\,A^{-1}`); None if no grad."""
        w = self.module.weight.grad
        if w is None:
            return None
        gw = w.reshape(self.d_g, -1)
        if not self.has_bias:
            return gw
        b = self.module.bias.grad
        b = torch.zeros(self.d_g, dtype=gw.dtype, device=gw.device) if b is None else b
        return torch.cat([gw, b.unsqueeze(1)], dim=1)

    def _forward(self, x: Tensor, h: Tensor) -> Tensor:
        """Accumulate the forward-side statistics of one call and tap the output for the backward side."""
        fA, fa, fh, fG, fg = self._state.flags
        conv = self.kind == "conv2d"
        xd, hd = x.detach(), h.detach()
        if fA or fa:
            rows = _conv_patches(self.module, xd) if conv else xd.reshape(-1, xd.shape[-1])
            if self.has_bias:
                rows = F.pad(rows, (0, 1), value=1.0)
            rows = _rows_dtype(rows, self.dtype, scaled=False)
            if rows.shape[0] > 0:
                if fA:
                    _factor_rows_(self._state, self._A, self.n_A, rows, not conv)
                    self.n_s.add_(_num_samples(xd, conv))
                if fa:
                    _mean_rows_(self._state, self._a_mean, self.n_a, rows.sum(0, dtype=self.dtype), rows.shape[0])
        if fh:
            m = hd.numel() // self.d_g
            if m > 0:
                _mean_rows_(self._state, self._h_mean, self.n_h, _out_rowsum(hd, conv, self.dtype), m)
        if fG or fg:
            h = _GTap.apply(h, self._G, self._g_mean, self.n_G, self.n_g, fG, fg, conv, self._state.grad_scale)
        return h

    def __repr__(self) -> str:
        return (
            f"LayerStats(name={self.name!r}, kind={self.kind!r}, has_bias={self.has_bias}, d_a={self.d_a}, "
            f"d_g={self.d_g}, dtype={self.dtype}, device={self.A.device})"
        )


class _CaptureMixin:
    """Forward of a captured layer: the original forward, then :meth:`LayerStats._forward` when grad is on."""

    _fastcurv_stats: LayerStats

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 (nn.Module's name)
        out = super().forward(input)  # type: ignore[misc]
        if torch.is_grad_enabled() and out.requires_grad:
            out = self._fastcurv_stats._forward(input, out)
        return out


class CapturedLinear(_CaptureMixin, nn.Linear):
    """``nn.Linear`` whose forward feeds a :class:`Capture` (installed by class swap; do not instantiate)."""


class CapturedConv2d(_CaptureMixin, nn.Conv2d):
    """``nn.Conv2d`` whose forward feeds a :class:`Capture` (installed by class swap; do not instantiate)."""


_SWAPPED: dict[type, type] = {nn.Linear: CapturedLinear, nn.Conv2d: CapturedConv2d}


def _captured_class(cls: type) -> type:
    if cls not in _SWAPPED:
        _SWAPPED[cls] = type("Captured" + cls.__name__, (_CaptureMixin, cls), {"__module__": __name__})
    return _SWAPPED[cls]


def is_captured(module: nn.Module) -> bool:
    """Whether ``module`` is currently captured by a live :class:`Capture` (its class is swapped)."""
    return isinstance(module, _CaptureMixin)


def base_type(module: nn.Module) -> type:
    """The class of ``module`` before a :class:`Capture` swapped it (``type(module)`` when not captured)."""
    cls = type(module)
    if issubclass(cls, _CaptureMixin):
        return next(b for b in cls.__mro__[1:] if not issubclass(b, _CaptureMixin))
    return cls


def _supported(mod: nn.Module) -> str | None:
    """None if ``mod`` can be captured (also when another Capture holds it: the new one takes over), else the
    reason."""
    if isinstance(mod, nn.Linear):
        base = nn.Linear
    elif isinstance(mod, nn.Conv2d):
        base = nn.Conv2d
        if mod.groups != 1:
            return f"grouped convolutions (groups={mod.groups}) are not supported"
    else:
        return f"{type(mod).__name__} is not an nn.Linear or nn.Conv2d"
    if base_type(mod).forward is not base.forward:
        return f"{type(mod).__name__} overrides forward (only nn.Linear.forward / nn.Conv2d.forward are understood)"
    return None


# --------------------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------------------
class Capture:
    r"""Capture per-layer curvature statistics of ``model`` (see the module docstring).

    Parameters
    ----------
    model
        The model; its supported layers get their class swapped (undo with :meth:`remove`). Works before
        or after ``torch.compile(model)`` (a swap after compile costs one recompile).
    layers
        None: every ``nn.Linear`` / ``nn.Conv2d`` (exact types, ``groups=1``) in ``model.named_modules()``.
        Otherwise an iterable of modules or of their qualified names; subclasses are accepted if they do
        not override ``forward``. Unsupported entries raise ``TypeError`` (nothing is swapped). A layer
        already captured by another Capture (a second optimizer on the same model, or a ``copy.deepcopy`` of
        a captured model) is **taken over**: it feeds this Capture from now on, and the other one's
        :meth:`check_owner` raises (the optimizers call it at every step) and its :meth:`remove` leaves the
        layer alone.
    dtype
        Statistics dtype: ``torch.float32`` (default) or ``torch.float64``. bf16/fp16 activations are
        fine (the factor op accumulates in float32).
    grad_scale
        ``"batch"``: :math:`g = N\,\partial L/\partial h` with N = ``x.shape[0]`` of the call (for a
        batch-mean loss); or a fixed float :math:`c` (e.g. 1.0 for a summed loss).
    mode
        Initial :class:`Mode` (or iterable of names from :data:`STATS`); default ``"factors"``.

    ``cap.layers`` lists the :class:`LayerStats` in module order.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        layers: Iterable[nn.Module | str] | None = None,
        dtype: torch.dtype = torch.float32,
        grad_scale: str | float = "batch",
        mode: Mode | str | Iterable[str] = Mode.FACTORS,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        if isinstance(grad_scale, str):
            if grad_scale != "batch":
                raise ValueError(f"grad_scale must be 'batch' or a float, got {grad_scale!r}")
            scale: float | None = None
        elif isinstance(grad_scale, (int, float)) and not isinstance(grad_scale, bool):
            scale = float(grad_scale)
            if not (scale == scale and abs(scale) != float("inf")):
                raise ValueError(f"grad_scale must be finite, got {grad_scale}")
        else:
            raise TypeError(f"grad_scale must be 'batch' or a float, got {type(grad_scale).__name__}")
        self.dtype = dtype
        self._state = _State(_stat_set(mode), scale)
        self._removed = False

        names = {m: n for n, m in model.named_modules()}
        if layers is None:
            chosen = []
            for m in names:
                if base_type(m) in (nn.Linear, nn.Conv2d) and _supported(m) is None:
                    chosen.append(m)
        else:
            if isinstance(layers, (str, nn.Module)):
                raise TypeError("layers must be an iterable of modules or module names, not a single one")
            by_name = dict(model.named_modules())
            chosen = []
            for item in layers:
                if isinstance(item, str):
                    if item not in by_name:
                        raise ValueError(f"layers: model has no submodule named {item!r}")
                    item = by_name[item]
                if not isinstance(item, nn.Module):
                    raise TypeError(f"layers must hold modules or names, got {type(item).__name__}")
                if item not in names:
                    raise ValueError(f"layers: {type(item).__name__} module is not part of the model")
                why = _supported(item)
                if why is not None:
                    raise TypeError(f"layers: cannot capture {names[item] or '<root>'!r}: {why}")
                if item not in chosen:
                    chosen.append(item)
            order = {m: i for i, m in enumerate(names)}
            chosen.sort(key=order.__getitem__)

        self.layers: list[LayerStats] = []
        self._orig: list[tuple[nn.Module, type]] = []
        for m in chosen:
            st = LayerStats(m, names[m], self._state, dtype)
            cls = base_type(m)  # a layer another Capture holds is taken over (that one then fails check_owner)
            self._orig.append((m, cls))
            m._fastcurv_stats = st  # plain attribute (not a buffer): state_dict is unchanged
            m.__class__ = _captured_class(cls)
            self.layers.append(st)

    # ---- modes ------------------------------------------------------------------------------------------
    @property
    def stats_on(self) -> frozenset[str]:
        """Names of the statistics accumulated now."""
        return frozenset(s for s, f in zip(STATS, self._state.flags) if f)

    @property
    def grad_scale(self) -> str | float:
        return "batch" if self._state.grad_scale is None else self._state.grad_scale

    def set_mode(self, mode: Mode | str | Iterable[str]) -> None:
        """Accumulate from now on the statistics of ``mode`` (a :class:`Mode` or names from :data:`STATS`)."""
        self._state.flags = tuple(s in _stat_set(mode) for s in STATS)

    @contextlib.contextmanager
    def mode(self, mode: Mode | str | Iterable[str]) -> Iterator[Capture]:
        """Context manager: accumulate ``mode``'s statistics inside the block, restore the previous mode after.

        Under ``torch.compile`` the first call in a new mode recompiles once (guarded attribute); no graph
        break."""
        old = self._state.flags
        self.set_mode(mode)
        try:
            yield self
        finally:
            self._state.flags = old

    def paused(self) -> contextlib.AbstractContextManager[Capture]:
        """Context manager: accumulate nothing inside the block (same as ``mode("off")``)."""
        return self.mode(Mode.OFF)

    # ---- statistics -------------------------------------------------------------------------------------
    def reset(self, *names: str) -> None:
        """Zero the statistics ``names`` (default: all of :data:`STATS`) and their counters, in every layer.

        E.g. K-BFGS after its first pass: read ``h_mean``/``g_mean``, then ``reset("h_mean", "g_mean")``
        and run the second pass in ``"means"`` mode, keeping ``A``. Buffers of a layer whose module moved
        to another device are re-allocated there (all of them, zero)."""
        self._check_live()
        sel = _stat_set(names) if names else frozenset(STATS)
        ordered = [s for s in STATS if s in sel]
        ts: list[Tensor] = []
        state = self._state
        if state.pending or state.pending_means:  # rows not reduced yet: those of the reset statistics go
            gone = {id(getattr(st, "_" + k)) for st in self.layers for k in sel}
            state.pending = [e for e in state.pending if id(e[0]) not in gone]
            state.pending_means = [e for e in state.pending_means if id(e[0]) not in gone]
        for st in self.layers:
            dev = st.module.weight.device
            if st._A.device != dev:
                st._alloc(dev)
            ts += st.tensors(ordered)
        if ts:
            torch._foreach_zero_(ts)

    @staticmethod
    def unsupported_params(model: nn.Module) -> list[nn.Parameter]:
        """Parameters of ``model`` not covered by a :class:`Capture` (for the optimizers' fallback lists).

        A parameter is covered when it is the weight or bias of a module currently captured (by any
        Capture). Shared parameters are listed once, in ``model.parameters()`` order."""
        covered: set[int] = set()
        for m in model.modules():
            if isinstance(m, _CaptureMixin):
                covered.add(id(m.weight))
                if m.bias is not None:
                    covered.add(id(m.bias))
        return [p for p in model.parameters() if id(p) not in covered]

    # ---- lifetime ---------------------------------------------------------------------------------------
    def remove(self) -> None:
        """Restore the original classes and drop the statistics attributes (idempotent). Statistics already
        in ``cap.layers`` stay readable; a compiled model recompiles at its next call."""
        if self._removed:
            return
        for (m, cls), st in zip(self._orig, self.layers):
            if m.__dict__.get("_fastcurv_stats") is st:  # (a layer another Capture took over is left to it)
                m.__class__ = cls
                m.__dict__.pop("_fastcurv_stats", None)
        self._removed = True

    def owns_all(self) -> bool:
        """Whether every layer of this Capture still feeds it (False once another Capture took one over)."""
        return not self._removed and all(st.module.__dict__.get("_fastcurv_stats") is st for st in self.layers)

    def check_owner(self, who: str = "this optimizer") -> None:
        """Raise ``RuntimeError`` if this Capture was removed or another one took over some of its layers."""
        self._check_live()
        lost = [st.name or "<root>" for st in self.layers if st.module.__dict__.get("_fastcurv_stats") is not st]
        if lost:
            raise RuntimeError(
                f"{who}: layers {lost[:3]}{'...' if len(lost) > 3 else ''} were taken over by a newer fastcurv "
                f"optimizer (or Capture) built on the same model; a model feeds one optimizer's statistics at a time. "
                f"Step the newest optimizer, or build a new one"
            )

    def _check_live(self) -> None:
        if self._removed:
            raise RuntimeError("this Capture was removed; create a new one")

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (
            f"Capture({len(self.layers)} layers, dtype={self.dtype}, grad_scale={self.grad_scale!r}, "
            f"stats_on={sorted(self.stats_on)})"
        )
