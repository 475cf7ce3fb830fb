"""All three op families inside one ``torch.compile(fullgraph=True)`` region: one graph, no breaks, same numbers."""

from __future__ import annotations

import torch
import torch._dynamo
from torch._dynamo.utils import counters

from fastcurv import ops, reference


def _step(A, X, H, s, y, x, xi, w, wi, beta, mu2):
    ops.kron_factor_update_(A, X, beta)
    applied = ops.damped_bfgs_update_(H, s, y, mu2=mu2, grad_norm=torch.ones((), dtype=H.dtype))
    yr, yi = ops.complex_linear(x, xi, w, wi, dual=True)
    return applied, (yr * yi).sum()


def _inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    M = r(9, 9)
    H = M @ M.T / 9 + torch.eye(9, dtype=dtype)
    return dict(
        A=torch.eye(5, dtype=dtype), X=r(7, 5), H=H, s=r(9), y=r(9), x=r(4, 6), xi=r(4, 6), w=r(3, 6), wi=r(3, 6),
        beta=torch.tensor(0.9, dtype=dtype), mu2=torch.tensor(0.5, dtype=dtype),
    )


def test_all_ops_compile_fullgraph_one_graph(backend):
    torch._dynamo.reset()
    counters.clear()
    eager, comp = _inputs(), _inputs()
    f = torch.compile(_step, fullgraph=True, backend="aot_eager")
    for _ in range(3):
        a1, l1 = _step(**eager)
        a2, l2 = f(**comp)
        comp["beta"].fill_(0.8)  # a new hyperparameter value must not recompile
        eager["beta"].fill_(0.8)
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
    torch.testing.assert_close(comp["A"], eager["A"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(comp["H"], eager["H"], rtol=1e-12, atol=1e-12)
    assert bool(a1) == bool(a2)
    torch.testing.assert_close(l1, l2)


def test_ops_compile_with_inductor_matches_reference():
    """Inductor around the opaque ops: results equal the reference (guards against the alpha= miscompile family)."""
    torch._dynamo.reset()
    got, want = _inputs(), _inputs()
    f = torch.compile(_step, fullgraph=True)
    f(**got)
    reference.kron_factor_update_(want["A"], want["X"], want["beta"])
    reference.damped_bfgs_update_(want["H"], want["s"], want["y"], mu2=want["mu2"], grad_norm=1.0)
    torch.testing.assert_close(got["A"], want["A"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got["H"], want["H"], rtol=1e-12, atol=1e-12)


def test_explain_reports_no_breaks():
    torch._dynamo.reset()
    ex = torch._dynamo.explain(_step)(**_inputs())
    assert ex.graph_break_count == 0
    assert ex.graph_count == 1


def test_unnormalized_factor_update_compiles_without_breaks(backend):
    """``normalize=False`` is a bool in the op's schema: it traces into one graph and matches eager."""

    def f(As, Xs, beta):
        ops.kron_factor_update_foreach_(As, Xs, beta, normalize=False)
        return ops.kron_factor_update_(As[0], Xs[0], beta, normalize=False)

    torch._dynamo.reset()
    counters.clear()
    g = torch.Generator().manual_seed(1)
    Xs = [torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)]
    eager = [torch.eye(5, dtype=torch.float64), torch.eye(4, dtype=torch.float64)]
    comp = [A.clone() for A in eager]
    beta = torch.tensor(0.9, dtype=torch.float64)
    f(eager, Xs, beta)
    torch.compile(f, fullgraph=True, backend="aot_eager")(comp, Xs, beta)
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
    for a, b in zip(comp, eager):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    want = torch.eye(5, dtype=torch.float64)
    for _ in range(2):  # twice on layer 0: the foreach call, then the single call
        want = 0.9 * want + 0.1 * Xs[0].T @ Xs[0]
    torch.testing.assert_close(eager[0], want, rtol=1e-12, atol=1e-12)
