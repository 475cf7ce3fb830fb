"""fastcurv: second-order (curvature) optimizers for PyTorch at first-order speed.

* :mod:`fastcurv.ops` — public fused ops (Kronecker-factor updates, damped BFGS updates, complex-perturbed
  matmuls), Triton kernels on CUDA with eager references (:mod:`fastcurv.reference`) as the spec.
* :mod:`fastcurv.optim` — ``torch.optim.Optimizer`` implementations built on them.

Backend: ``FASTCURV_BACKEND=auto|triton|reference`` (see :mod:`fastcurv._backend`).
"""

from fastcurv import _backend

_backend.configure_interpreter()  # before anything imports triton

from fastcurv import ops, reference  # noqa: E402
from fastcurv._backend import use_backend  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ops", "reference", "use_backend", "__version__"]
