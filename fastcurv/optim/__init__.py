"""fastcurv optimizers: ``torch.optim.Optimizer`` subclasses built on :mod:`fastcurv.ops`.

All share the step protocol ``loss = opt.step(closure)`` (see :mod:`fastcurv.optim._base`).
"""

from fastcurv.optim._base import CurvatureOptimizer

__all__ = ["CurvatureOptimizer"]
