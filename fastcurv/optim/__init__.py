"""fastcurv optimizers: ``torch.optim.Optimizer`` subclasses built on :mod:`fastcurv.ops`.

All share the step protocol ``loss = opt.step(closure)`` (see :mod:`fastcurv.optim._base`); the methods
built on curvature-vector products (``NewtonCG``, ``BlockHF``, ``ExactNewton``) also take the minibatch,
``opt.step(closure, batch=(x, y))``, and the loss function at construction.
"""

from fastcurv.optim._base import CurvatureOptimizer
from fastcurv.optim.block_hf import BlockHF
from fastcurv.optim.ekfac import EKFAC
from fastcurv.optim.exact_newton import ExactNewton
from fastcurv.optim.kbfgs import KBFGS, KBFGSL
from fastcurv.optim.kfac import KFAC
from fastcurv.optim.newton_cg import NewtonCG
from fastcurv.optim.soap import SOAP

__all__ = ["CurvatureOptimizer", "KFAC", "KBFGS", "KBFGSL", "NewtonCG", "BlockHF", "ExactNewton", "SOAP", "EKFAC"]
