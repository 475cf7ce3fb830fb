"""One optimizer's timed run of the comparison: seeded minibatches, construction, warm-up outside the clock,
the training clock, evaluations, divergence detection (the protocol: docs/compare.md)."""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fastcurv.compare.config import CompareConfig
from fastcurv.compare.errors import one_line
from fastcurv.compare.registry import OptimizerEntry, accepted_kwargs
from fastcurv.compare.schema import finite_or_none, jsonable
from fastcurv.data import Problem
from fastcurv.lm import LMProblem

__all__ = ["BLOWUP", "MAX_NONFINITE", "Runner"]

#: consecutive non-finite losses (with finite parameters) after which a run is declared diverged
MAX_NONFINITE = 20
#: a minibatch loss above BLOWUP x the initial evaluated train loss ends a run as diverged
BLOWUP = 100.0


class _Batches:
    """Infinite stream of minibatches: a seeded permutation per epoch, sliced into ``batch_size`` rows."""

    def __init__(self, x: Tensor, batch_size: int, seed: int) -> None:
        self.x = x
        self.b = batch_size
        self.gen = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[Tensor]:
        n = self.x.shape[0]
        while True:
            perm = torch.randperm(n, generator=self.gen).to(self.x.device)
            for i in range(0, n - self.b + 1, self.b):
                yield self.x.index_select(0, perm[i : i + self.b])


def _mean_loss(problem: Problem | LMProblem, model: nn.Module, x: Tensor, chunk: int = 5000) -> float:
    """Mean per-example loss of ``model`` on the rows of ``x`` (no grad, chunked)."""
    total = 0.0
    with torch.no_grad():
        for i in range(0, x.shape[0], chunk):
            xb, yb = problem.split(x[i : i + chunk])
            total += float(problem.loss_fn(model(xb), yb)) * xb.shape[0]
    return total / x.shape[0]


def preconditioned_share(opt: Any, model: nn.Module) -> dict[str, Any] | None:
    """Which share of the model's trainable parameters a fastcurv optimizer preconditions (the ones its
    ``describe()`` lists as not on the fallback): ``{"elements", "of_elements", "share", "tensors",
    "of_tensors"}``; None for any other optimizer (it does not say how it treats each tensor)."""
    method = getattr(opt, "_method", None)
    if not isinstance(method, dict) or not type(opt).__module__.startswith("fastcurv."):
        return None
    trainable = {id(p): p for p in model.parameters() if p.requires_grad}
    ids = {id(q) for q in method}
    pre = [p for p in trainable.values() if id(p) in ids]
    total = sum(p.numel() for p in trainable.values())
    n = sum(p.numel() for p in pre)
    return {
        "elements": n, "of_elements": total, "share": n / total if total else 0.0,
        "tensors": len(pre), "of_tensors": len(trainable),
    }


@dataclass
class Runner:
    """Everything shared by the runs of one comparison (data on the device, settings)."""

    problem: Problem | LMProblem
    cfg: CompareConfig
    train_x: Tensor
    eval_train: Tensor
    eval_test: Tensor
    batch_size: int

    def build_model(self) -> nn.Module:
        return self.problem.build_model(self.cfg.seed, dtype=self.cfg.dtype).to(self.cfg.device)

    # ---------------------------------------------------------------------------------------- optimizer
    def make_optimizer(self, entry: OptimizerEntry, cls: type, model: nn.Module, kwargs: dict[str, Any]):
        """Build the optimizer and return ``(step_fn, optimizer, hyperparameters)``; ``step_fn(closure, xb)``
        (``xb`` the minibatch the closure evaluates) returns the loss (a detached tensor)."""
        kwargs = dict(kwargs)
        switch = contextlib.nullcontext
        compiled: bool | None = None
        if entry.compile_switch is not None:
            choice = kwargs.pop("compile", "auto")
            compiled = self.cfg.device.type == "cuda" if choice == "auto" else bool(choice)
            switch = functools.partial(entry.compile_switch, compiled)
        if entry.from_params or entry.is_torch:
            if (entry.is_torch and self.cfg.device.type == "cuda" and "fused" not in kwargs
                    and "foreach" not in kwargs and "fused" in (accepted_kwargs(cls) or ())):
                kwargs["fused"] = True
            with switch():
                opt = cls(model.parameters(), **kwargs)

            def step_fn(closure: Callable[[], Tensor], xb: Tensor) -> Tensor:
                with switch():
                    opt.zero_grad(set_to_none=True)
                    loss = closure()
                    loss.backward()
                    opt.step()
                return loss.detach()

            group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
            hp = {k: jsonable(v) for k, v in group.items() if v is not None}
            if compiled is not None:
                hp["compile"] = compiled
            return step_fn, opt, hp
        if entry.target == "fastcurv.optim:KFAC" and "seed" not in kwargs:
            kwargs["seed"] = self.cfg.seed
        if entry.loss_arg is not None and "loss_fn" not in kwargs:
            kwargs["loss_fn"] = entry.loss_arg(self.problem)
        opt = cls(model, **kwargs)
        if entry.batch_step:

            def step_fn(closure: Callable[[], Any], xb: Tensor) -> Tensor:
                return opt.step(closure, batch=self.problem.split(xb))

        else:

            def step_fn(closure: Callable[[], Any], xb: Tensor) -> Tensor:
                return opt.step(closure)

        hp = {k: jsonable(v) for k, v in opt.param_groups[0].items() if k != "params"}
        for attr in ("history", "inv_every", "fisher", "likelihood", "damping_split", "inverse", "seed"):
            if attr in kwargs:
                hp[attr] = jsonable(kwargs[attr])
            elif isinstance(getattr(opt, attr, None), (int, float, str)) and not attr.startswith("_"):
                hp[attr] = jsonable(getattr(opt, attr))
        return step_fn, opt, hp

    def closure_for(self, entry: OptimizerEntry, model: nn.Module, xb: Tensor) -> Callable[[], Any]:
        loss_fn = self.problem.loss_fn
        x, y = self.problem.split(xb)
        if entry.closure_output:

            def closure_out() -> tuple[Tensor, Tensor]:
                out = model(x)
                return loss_fn(out, y), out

            return closure_out
        return lambda: loss_fn(model(x), y)

    # ---------------------------------------------------------------------------------------- one run
    def run(
        self,
        entry: OptimizerEntry,
        cls: type,
        kwargs: dict[str, Any],
        *,
        budget: float,
        n_evals: int,
        label: str,
        skip: str | None = None,
    ) -> dict[str, Any]:
        """Train one optimizer under ``budget`` seconds of training clock; returns its JSON record (status
        ``"skipped"`` with ``skip`` as the message, without running anything, when ``skip`` is given)."""
        cfg = self.cfg
        wall0 = time.perf_counter()
        rec: dict[str, Any] = {
            "name": entry.name,
            "class": entry.target.replace(":", "."),
            "hyperparameters": {k: jsonable(v) for k, v in kwargs.items()},
            "status": "ok",
            "error": None,
            "steps": 0,
            "skipped_steps": 0,
            "train_seconds": 0.0,
            "wall_seconds": 0.0,
            "ms_per_step": None,
            "final_train_loss": None,
            "final_test_loss": None,
            "time_to_target": None,
            "time_to_target_ratio": None,
            "curve": {"step": [], "seconds": [], "train_loss": []},
            "evals": {"step": [], "seconds": [], "train_loss": [], "test_loss": []},
            "counters": {},
            "tuning": None,
            "preconditioned": None,
        }
        curve, evals = rec["curve"], rec["evals"]
        shadow = self.build_model()
        shadow.requires_grad_(False)

        def fail(status: str, message: str) -> dict[str, Any]:
            rec["status"], rec["error"] = status, message
            rec["wall_seconds"] = time.perf_counter() - wall0
            return rec

        if skip is not None:
            return fail("skipped", skip)
        torch.manual_seed(cfg.seed)
        # ---- warm-up on a throwaway copy (one-time compilation / autotuning / library init)
        if cfg.warmup_steps:
            try:
                wmodel = self.build_model()
                wstep, wopt, _ = self.make_optimizer(entry, cls, wmodel, kwargs)
                for xb, _ in zip(_Batches(self.train_x, self.batch_size, cfg.seed), range(cfg.warmup_steps)):
                    float(wstep(self.closure_for(entry, wmodel, xb), xb))
                del wmodel, wstep, wopt
            except Exception as e:
                return fail("error", f"warm-up: {one_line(e)}")
            torch.manual_seed(cfg.seed)

        model = self.build_model()
        try:
            step_fn, opt, hp = self.make_optimizer(entry, cls, model, kwargs)
        except Exception as e:
            return fail("error", f"construction: {one_line(e)}")
        rec["hyperparameters"] = hp
        rec["preconditioned"] = preconditioned_share(opt, model)
        params = [p for p in model.parameters()]
        shadow_params = list(shadow.parameters())

        def evaluate(step: int, clock: float) -> float:
            with torch.no_grad():
                torch._foreach_copy_(shadow_params, params)
            tr = _mean_loss(self.problem, shadow, self.eval_train)
            te = _mean_loss(self.problem, shadow, self.eval_test)
            evals["step"].append(step)
            evals["seconds"].append(clock)
            evals["train_loss"].append(tr)
            evals["test_loss"].append(te)
            return tr

        bar = None
        if cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=round(budget, 2), desc=f"{label:>14}", unit="s", leave=True, file=sys.stderr,
                bar_format="{desc} |{bar}| {n:.1f}/{total:.1f}s{postfix}", dynamic_ncols=True, mininterval=0.2,
            )

        def show(step: int, clock: float, loss: float, final: bool = False) -> None:
            if bar is None:
                return
            rate = step / clock if clock > 0 else 0.0
            bar.n = min(clock, bar.total)
            bar.set_postfix_str(
                f"loss {loss:.4g} | {rate:.1f} steps/s | step {step} | {time.perf_counter() - wall0:.0f}s elapsed",
                refresh=False,
            )
            bar.refresh() if final else bar.update(0)

        def due(k: int, step: int, clock: float) -> bool:  # is the k-th scheduled evaluation due?
            by_steps = cfg.max_steps is not None and step >= math.ceil(k * cfg.max_steps / n_evals)
            return clock >= k * budget / n_evals or by_steps

        step, clock, last = 0, 0.0, float("nan")
        n_bad = 0
        next_eval = 1
        try:
            loss0 = evaluate(0, 0.0)
            batches = iter(_Batches(self.train_x, self.batch_size, cfg.seed))
            last_show = 0.0
            while clock < budget and (cfg.max_steps is None or step < cfg.max_steps):
                t0 = time.perf_counter()
                xb = next(batches)
                try:
                    loss = step_fn(self.closure_for(entry, model, xb), xb)
                    last = float(loss) if loss is not None else float("nan")
                except Exception as e:
                    clock += time.perf_counter() - t0
                    fail("error", f"step {step + 1}: {one_line(e)}")
                    break
                clock += time.perf_counter() - t0
                step += 1
                curve["step"].append(step)
                curve["seconds"].append(clock)
                curve["train_loss"].append(last)
                if math.isfinite(last) and last > BLOWUP * max(loss0, 1e-30):
                    fail("diverged", f"step {step}: loss {last:.3g} > {BLOWUP:g}x the initial {loss0:.4g}")
                    break
                if not math.isfinite(last):
                    n_bad += 1
                    bad_params = not all(bool(torch.isfinite(p).all()) for p in params)
                    if bad_params or n_bad >= MAX_NONFINITE:
                        why = "parameters became non-finite" if bad_params else f"{n_bad} consecutive non-finite losses"
                        fail("diverged", f"step {step}: {why}")
                        break
                else:
                    n_bad = 0
                if next_eval < n_evals and due(next_eval, step, clock):
                    evaluate(step, clock)
                    while next_eval < n_evals and due(next_eval, step, clock):
                        next_eval += 1
                if bar is not None and time.perf_counter() - last_show > 0.2:
                    show(step, clock, last)
                    last_show = time.perf_counter()
            if not evals["step"] or evals["step"][-1] != step:
                evaluate(step, clock)
        except Exception as e:  # evaluation failure: report, keep the comparison going
            fail("error", f"evaluation: {one_line(e)}")
        finally:
            if bar is not None:
                show(step, clock, last, final=True)
                bar.close()
        rec["steps"] = step
        rec["train_seconds"] = clock
        rec["ms_per_step"] = 1000.0 * clock / step if step else None
        counters = getattr(opt, "counters", None)
        if callable(counters):
            rec["counters"] = {k: jsonable(v) for k, v in counters().items()}
        rec["skipped_steps"] = int(getattr(opt, "skipped_steps", 0) or 0)
        if evals["train_loss"]:
            rec["final_train_loss"] = finite_or_none(evals["train_loss"][-1])
            rec["final_test_loss"] = finite_or_none(evals["test_loss"][-1])
            if rec["status"] == "ok" and rec["final_train_loss"] is None:
                fail("diverged", "final train loss is not finite")
        rec["wall_seconds"] = time.perf_counter() - wall0
        return rec
