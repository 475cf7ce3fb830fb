"""fastcurv optimizers: ``torch.optim.Optimizer`` subclasses built on :mod:`fastcurv.ops`.

All share the step protocol ``loss = opt.step(closure)`` (see :mod:`fastcurv.optim._base`).
"""

from fastcurv.optim._base import CurvatureOptimizer
from fastcurv.optim.kfac import KFAC

__all__ = ["CurvatureOptimizer"]
__all__ += ["KFAC"]
from fastcurv.optim.kbfgs import KBFGS, KBFGSL  # noqa: E402

__all__ += ["KBFGS", "KBFGSL"]
