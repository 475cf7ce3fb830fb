"""Data sets and problem definitions for the classic deep-autoencoder optimizer comparison.

The benchmark is Hinton & Salakhutdinov's (Science, 2006) deep autoencoders, in the form used by
Hessian-free (Martens 2010), K-FAC (Martens & Grosse 2015) and K-BFGS (Goldfarb, Ren & Bahamou 2020):

======== ================================================== ========================== =====================
problem  layer widths (code layer in brackets)              loss                       data
======== ================================================== ========================== =====================
mnist    784-1000-500-250-[30]-250-500-1000-784             sigmoid cross-entropy      user file (``data=``)
faces    625-2000-1000-500-[30]-500-1000-2000-625           1/2 squared error          user file (``data=``)
curves   784-400-200-100-50-25-[6]-25-50-100-200-400-784    sigmoid cross-entropy      generated (or file)
digits   64-100-50-25-[8]-25-50-100-64                      sigmoid cross-entropy      scikit-learn bundled
======== ================================================== ========================== =====================

Every layer is fully connected with a bias; ReLU follows every layer except the code layer and the output
layer, which are linear (the K-BFGS code's choice, ``models.py``). Both losses are *summed over pixels and
averaged over the batch* (:meth:`Problem.loss_fn`). ``digits`` is a small stand-in of our own (not from the
papers): scikit-learn's 1,797 8x8 digits, with MNIST's hidden widths divided by 10 and a code of 8 units, so
that a CPU-only comparison runs in seconds.

The CURVES generator (:func:`make_curves`)
-------------------------------------------
The original set (``digs3pts_1.mat``, made by R. Salakhutdinov and distributed on J. Martens' web page)
holds 20,000 training and 10,000 test 28x28 images with real values in [0, 1], used as Bernoulli
cross-entropy targets (by the HF and K-BFGS code). Hinton & Salakhutdinov describe the images, as we recall
their wording, as "curves" generated from three randomly chosen points in two dimensions; the file name
("3pts") says the same. That is all we could go on: the supporting material's exact recipe (spline type,
placement constraints, pen) was not available to us, so the recipe below is our own and the generated set
is a *faithful-in-spirit substitute, not a copy*:

1. Three control points uniformly at random in the square [2, 25]^2 (pixel-centre coordinates run 0..27),
   redrawn until every pair is at least 5 px apart (so a curve is never a dot).
2. The points are ordered so that the middle one is the vertex opposite the longest side of their triangle,
   i.e. the curve visits them along the shortest path; this gives open arcs bending by at most 120 degrees
   at the middle point rather than hairpins.
3. A natural cubic spline (zero second derivative at both ends) through the three points with chord-length
   parametrisation ``t0 = 0, t1 = |P1 - P0|, t2 = t1 + |P2 - P1|``. With ``h0 = t1 - t0``, ``h1 = t2 - t1``
   and ``M0 = M2 = 0`` the second derivative at the middle knot is
   ``M1 = 3 [(P2 - P1)/h1 - (P1 - P0)/h0] / (h0 + h1)`` and each segment is the usual cubic
   ``S(t) = M_i (t_{i+1} - t)^3 / (6h) + M_{i+1} (t - t_i)^3 / (6h) + (P_i/h - M_i h/6)(t_{i+1} - t)
   + (P_{i+1}/h - M_{i+1} h/6)(t - t_i)``.
4. The curve is sampled at 128 equally spaced parameter values (the longest curves are ~46 px long, so
   samples are at most ~0.37 px apart) and drawn with a round pen of radius r = 1 px, anti-aliased by a
   one-pixel linear ramp: pixel intensity ``clamp(r + 1/2 - d, 0, 1)`` where ``d`` is the distance from the
   pixel centre to the nearest curve sample. So the stroke core (d <= 1/2) is 1, the stroke is ~2 px wide at
   half intensity, edge pixels are grey, and the background is exactly 0. Parts of a
   spline that overshoot the image are clipped.

Differences from the original that we know of: the exact recipe (steps 1-4) is ours, so the distribution of
curve lengths, bends, stroke widths and grey levels will differ; no noise is added; the set is generated on
the fly (deterministic for a seed) instead of being read from the file. To use the real file, pass
``load_problem("curves", data="digs3pts_1.mat")`` (needs scipy) or an ``.npz`` with ``x_train``/``x_test``.

Determinism: image ``i`` of a split depends only on ``(seed, split, i)`` — images come in blocks of 256, each
from its own ``numpy.random.Generator`` seeded by ``SeedSequence([seed, split, block])`` — so a smaller
``n_train`` gives a prefix of a larger one and the test set does not depend on ``n_train``. No global RNG is
touched. 20,000 images take well under a second on one CPU core.

Data files (MNIST, FACES, or a real CURVES file)
-------------------------------------------------
``load_problem(name, data=path)`` reads ``.npz`` files with arrays ``x_train`` and ``x_test`` (shape ``(N, D)``
or ``(N, side, side)``, a singleton channel axis allowed), MNIST idx files (optionally gzipped: a directory
holding ``train-images-idx3-ubyte[.gz]`` and ``t10k-images-idx3-ubyte[.gz]``, the training-images file
itself, or a ``(train, test)`` pair of paths), and the original MATLAB files (Martens' ``mnist_all.mat``,
``newfaces_rot_single.mat``, ``digs3pts_1.mat``) when scipy happens to be installed — scipy is *not* a
dependency of fastcurv. Anything wrong with a file raises :class:`ProblemError` with a one-line message that
names the file and the expected format, before any training starts.

Value conventions: for the cross-entropy problems (mnist, curves, digits) pixel values must lie in [0, 1];
integer-valued data in 0..255 (e.g. raw uint8 MNIST) is divided by 255 (the papers' preprocessing), the
decision being taken jointly for both splits. FACES is used as stored (real-valued, as in the K-BFGS code),
except that integer data is divided by 255 too. Tensors are returned as float32 on the CPU.
"""

from __future__ import annotations

import gzip
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union

import numpy as np
import torch
from torch import Tensor, nn

from fastcurv import losses

__all__ = ["PROBLEMS", "Problem", "ProblemError", "load_problem", "make_curves"]

#: The problem names :func:`load_problem` knows.
PROBLEMS: tuple[str, ...] = ("curves", "digits", "mnist", "faces")

DataPath = Union[str, Path, Sequence[Union[str, Path]]]


class ProblemError(ValueError):
    """A problem could not be set up: unknown name, missing or malformed data file, bad arguments."""


# --------------------------------------------------------------------------------------------------------------
# Problem definitions
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    layer_sizes: tuple[int, ...]
    loss: Literal["bce", "mse"]
    side: int  # images are side x side
    expected: str  # accepted file formats, for error messages

    @property
    def code_layer(self) -> int:
        return int(np.argmin(self.layer_sizes))


_NPZ = "an .npz with arrays x_train and x_test of shape (N, {d}) or (N, {s}, {s})"
_SPECS: dict[str, _Spec] = {
    "mnist": _Spec(
        (784, 1000, 500, 250, 30, 250, 500, 1000, 784),
        "bce",
        28,
        _NPZ.format(d=784, s=28)
        + ", MNIST idx files (a directory with train-images-idx3-ubyte[.gz] and t10k-images-idx3-ubyte[.gz],"
        " the training file, or a (train, test) pair), or Martens' mnist_all.mat (needs scipy)",
    ),
    "faces": _Spec(
        (625, 2000, 1000, 500, 30, 500, 1000, 2000, 625),
        "mse",
        25,
        _NPZ.format(d=625, s=25) + ", or Martens' newfaces_rot_single.mat (needs scipy)",
    ),
    "curves": _Spec(
        (784, 400, 200, 100, 50, 25, 6, 25, 50, 100, 200, 400, 784),
        "bce",
        28,
        _NPZ.format(d=784, s=28) + ", or Martens' digs3pts_1.mat (needs scipy); or data=None to generate",
    ),
    "digits": _Spec(
        (64, 100, 50, 25, 8, 25, 50, 100, 64),
        "bce",
        8,
        "no file: the data come from scikit-learn (pip install 'fastcurv[digits]')",
    ),
}

_LOSS_TEXT = {
    "bce": "sigmoid cross-entropy on the logits, summed over pixels, mean over the batch",
    "mse": "1/2 squared error, summed over pixels, mean over the batch",
}


@dataclass(frozen=True, eq=False)
class Problem:
    """A deep-autoencoder benchmark problem: data, architecture and loss.

    Attributes:
        name: one of :data:`PROBLEMS`.
        train_x, test_x: float32 CPU tensors of shape (N, D), D = ``layer_sizes[0]``; values in [0, 1] when
            ``loss == "bce"``. The autoencoder's target is its input.
        layer_sizes: widths of all layers, input first, output (= input width) last.
        loss: ``"bce"`` (Bernoulli/sigmoid cross-entropy) or ``"mse"`` (1/2 squared error).
        code_layer: index into ``layer_sizes`` of the linear bottleneck (``layer_sizes[code_layer]`` is the code
            width; the ``code_layer``-th Linear, counting from 1, is not followed by a ReLU).
        description: one human-readable paragraph (source of the data, sizes, architecture, loss).
    """

    name: str
    train_x: Tensor = field(repr=False)
    test_x: Tensor = field(repr=False)
    layer_sizes: list[int]
    loss: Literal["bce", "mse"]
    code_layer: int
    description: str

    def __post_init__(self) -> None:
        sizes = list(self.layer_sizes)
        if len(sizes) < 3 or any(not isinstance(s, int) or s < 1 for s in sizes) or sizes[0] != sizes[-1]:
            raise ProblemError(f"{self.name}: layer_sizes must be >= 3 positive ints, first == last; got {sizes}")
        if self.loss not in ("bce", "mse"):
            raise ProblemError(f"{self.name}: loss must be 'bce' or 'mse', got {self.loss!r}")
        if not 0 < self.code_layer < len(sizes) - 1:
            raise ProblemError(f"{self.name}: code_layer must index a hidden layer of {sizes}, got {self.code_layer}")
        for split, x in (("train_x", self.train_x), ("test_x", self.test_x)):
            if not isinstance(x, Tensor) or x.dtype != torch.float32 or x.ndim != 2 or x.shape[1] != sizes[0]:
                got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
                raise ProblemError(f"{self.name}: {split} must be a float32 tensor (N, {sizes[0]}), got {got}")
            if x.shape[0] == 0:
                raise ProblemError(f"{self.name}: {split} is empty")

    @staticmethod
    def split(batch: Tensor) -> tuple[Tensor, Tensor]:
        """Model input and loss target of a minibatch of rows: an autoencoder's target is its input."""
        return batch, batch

    @property
    def input_dim(self) -> int:
        """Number of pixels D (input width = output width)."""
        return self.layer_sizes[0]

    def build_model(self, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
        """The autoencoder: ``Linear(l_i, l_{i+1})`` with bias for each consecutive pair of ``layer_sizes``,
        each followed by ``ReLU`` except the layer producing the code and the output layer (both linear; the
        output is logits for ``"bce"``, the reconstruction itself for ``"mse"``).

        Initialisation: PyTorch's default ``nn.Linear`` distribution, which is what the K-BFGS reference code
        uses (it never re-initialises): ``W, b ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` i.i.d. (= kaiming_uniform
        with a = sqrt(5)). The numbers are drawn in float32 from a private ``torch.Generator`` seeded with
        ``seed`` — layer by layer, weight then bias — and then cast to ``dtype``, so the model is reproducible,
        the global RNG is untouched, and a float64 model starts from exactly the float32 model's values.

        Args:
            seed: initialisation seed (any int accepted by ``torch.Generator.manual_seed``).
            dtype: floating dtype of the parameters.
        """
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"build_model: dtype must be a floating torch.dtype, got {dtype!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"build_model: seed must be an int, got {type(seed).__name__}")
        gen = torch.Generator().manual_seed(seed)
        sizes = self.layer_sizes
        n_lin = len(sizes) - 1
        layers: list[nn.Module] = []
        for i in range(n_lin):
            fan_in, fan_out = sizes[i], sizes[i + 1]
            lin = torch.nn.utils.skip_init(nn.Linear, fan_in, fan_out, bias=True, dtype=dtype)
            bound = 1.0 / math.sqrt(fan_in)
            with torch.no_grad():
                lin.weight.copy_(torch.empty(fan_out, fan_in).uniform_(-bound, bound, generator=gen))
                lin.bias.copy_(torch.empty(fan_out).uniform_(-bound, bound, generator=gen))
            layers.append(lin)
            if i + 1 != self.code_layer and i + 1 != n_lin:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    def loss_fn(self, output_logits: Tensor, target: Tensor) -> Tensor:
        """The papers' training loss for a batch of N examples (a 0-d tensor).

        * ``"bce"``: ``(1/N) sum_{n,j} [softplus(z_nj) - t_nj z_nj]`` — i.e. ``-(t log s(z) + (1-t) log(1-s(z)))``
          with ``s`` the logistic sigmoid — computed stably by ``binary_cross_entropy_with_logits``.
        * ``"mse"``: ``(1/N) sum_{n,j} (z_nj - t_nj)^2 / 2``.

        Args:
            output_logits: model output ``z`` of shape (N, D) (logits for ``"bce"``).
            target: targets ``t`` of the same shape (the input images).
        """
        if output_logits.shape != target.shape or output_logits.ndim != 2 or output_logits.shape[0] == 0:
            raise ValueError(
                f"loss_fn: output_logits and target must have the same shape (N, D) with N >= 1, got "
                f"{tuple(output_logits.shape)} and {tuple(target.shape)}"
            )
        return losses.nll("bernoulli" if self.loss == "bce" else "gaussian", output_logits, target)


# --------------------------------------------------------------------------------------------------------------
# CURVES generator
# --------------------------------------------------------------------------------------------------------------

_SIDE = 28
_MARGIN = 2.0  # control points uniform in [_MARGIN, _SIDE - 1 - _MARGIN]^2
_MIN_DIST = 5.0  # minimum pairwise distance between control points (px)
_PEN_RADIUS = 1.0  # pen radius r (px); intensity = clamp(r + 1/2 - d, 0, 1)
_SAMPLES = 128  # spline samples per curve (longest curves are ~46 px: samples <= ~0.37 px apart)
_BLOCK = 256  # images per independently seeded block
_SPLIT_ID = {"train": 0, "test": 1}


def _control_points(seed: int, split: int, block: int) -> np.ndarray:
    """(_BLOCK, 3, 2) control points (x, y), ordered so the middle one is opposite the longest side."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, split, block]))
    lo, hi = _MARGIN, _SIDE - 1 - _MARGIN

    def sides(p: np.ndarray) -> np.ndarray:  # side opposite vertex k, k = 0, 1, 2
        return np.stack(
            [
                np.linalg.norm(p[:, 1] - p[:, 2], axis=-1),
                np.linalg.norm(p[:, 0] - p[:, 2], axis=-1),
                np.linalg.norm(p[:, 0] - p[:, 1], axis=-1),
            ],
            axis=1,
        )

    pts = rng.uniform(lo, hi, size=(_BLOCK, 3, 2))
    bad = sides(pts).min(axis=1) < _MIN_DIST
    while bad.any():  # rejection sampling; ~1/4 of draws are rejected, so a few rounds suffice
        pts[bad] = rng.uniform(lo, hi, size=(int(bad.sum()), 3, 2))
        bad = sides(pts).min(axis=1) < _MIN_DIST
    order = np.array([[1, 0, 2], [0, 1, 2], [0, 2, 1]])[np.argmax(sides(pts), axis=1)]  # middle = argmax
    return np.take_along_axis(pts, order[:, :, None], axis=1)


def _spline_samples(ctrl: np.ndarray, k: int) -> np.ndarray:
    """Natural cubic spline through ``ctrl`` (m, 3, 2), chord-length knots, sampled at k uniform params: (m, k, 2)."""
    p0, p1, p2 = ctrl[:, 0:1], ctrl[:, 1:2], ctrl[:, 2:3]  # (m, 1, 2)
    h0 = np.linalg.norm(p1 - p0, axis=-1, keepdims=True)  # (m, 1, 1)
    h1 = np.linalg.norm(p2 - p1, axis=-1, keepdims=True)
    m1 = 3.0 * ((p2 - p1) / h1 - (p1 - p0) / h0) / (h0 + h1)  # second derivative at the middle knot
    t = np.linspace(0.0, 1.0, k, dtype=ctrl.dtype).reshape(1, k, 1) * (h0 + h1)  # (m, k, 1)
    u = t  # local parameter on segment 0, in [0, h0]
    seg0 = m1 * u**3 / (6 * h0) + p0 / h0 * (h0 - u) + (p1 / h0 - m1 * h0 / 6) * u
    w = h0 + h1 - t  # t2 - t on segment 1, in [0, h1]
    seg1 = m1 * w**3 / (6 * h1) + (p1 / h1 - m1 * h1 / 6) * w + p2 / h1 * (h1 - w)
    return np.where(t <= h0, seg0, seg1)


def _render(samples: np.ndarray) -> np.ndarray:
    """Anti-aliased stroke through curve samples (m, k, 2) in pixel coordinates -> (m, _SIDE**2) in [0, 1].

    Each sample ``c`` is splatted onto the pixels ``round(c) + o`` that can be within the pen's reach
    ``R = r + 1/2`` (``|o| < R + 1/2`` per axis, since ``|c - round(c)| <= 1/2``); every pixel keeps the minimum
    squared distance (``np.minimum.at``) and gets ``clamp(R - sqrt(d2_min), 0, 1)``. Samples are clamped to
    ``[-R, side - 1 + R]`` first: a clamped sample is still >= R from every pixel along the clamped axis, so it
    adds no ink, and its splat always lands on the padded canvas. (NumPy, not torch: these small single-threaded
    ops would otherwise pay torch's intra-op thread synchronisation, which is very slow on a busy machine.)
    """
    m, k, _ = samples.shape
    reach = _PEN_RADIUS + 0.5
    o_max = math.ceil(reach + 0.5) - 1
    pad = math.ceil(reach + 0.5) + o_max
    wid = _SIDE + 2 * pad
    offs = np.arange(-o_max, o_max + 1)
    oy, ox = np.meshgrid(offs, offs, indexing="ij")
    ox_f, oy_f = ox.reshape(-1).astype(samples.dtype), oy.reshape(-1).astype(samples.dtype)
    off_flat = (oy * wid + ox).reshape(-1)

    c = np.clip(samples, -reach, _SIDE - 1 + reach)
    base = np.round(c)
    frac = c - base
    bi = base.astype(np.intp) + pad
    cell = bi[..., 1] * wid + bi[..., 0] + (np.arange(m) * (wid * wid))[:, None]  # (m, k)
    dx = ox_f - frac[..., 0:1]  # (m, k, O)
    dy = oy_f - frac[..., 1:2]
    d2 = dx * dx + dy * dy
    dmin = np.full(m * wid * wid, np.inf, dtype=samples.dtype)
    np.minimum.at(dmin, (cell[..., None] + off_flat).reshape(-1), d2.reshape(-1))
    img = dmin.reshape(m, wid, wid)[:, pad : pad + _SIDE, pad : pad + _SIDE]
    return np.clip(reach - np.sqrt(img), 0.0, 1.0).reshape(m, _SIDE * _SIDE)


def _curves_split(n: int, seed: int, split: str) -> Tensor:
    blocks = []
    for b in range(-(-n // _BLOCK)):
        ctrl = _control_points(seed, _SPLIT_ID[split], b).astype(np.float32)
        blocks.append(_render(_spline_samples(ctrl, _SAMPLES)))
    return torch.from_numpy(np.concatenate(blocks)[:n].astype(np.float32, copy=False)).contiguous()


def _check_count(value: object, what: str, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ProblemError(f"{what} must be a positive int, got {value!r}")


def make_curves(n_train: int = 20000, n_test: int = 10000, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Generate a CURVES-like data set: 28x28 grey images of smooth curves through three random points.

    See the module docstring for the recipe (three control points, natural cubic spline with chord-length
    knots, round anti-aliased pen ``clamp(r + 1/2 - d, 0, 1)``, r = 1 px) and how it differs from the original
    ``digs3pts_1.mat``. Deterministic for ``seed``; image ``i`` depends only on ``(seed, split, i)``.

    Args:
        n_train: number of training images (the original has 20,000).
        n_test: number of test images (the original has 10,000).
        seed: non-negative int.

    Returns:
        ``(train_x, test_x)``: float32 tensors of shape (n_train, 784) and (n_test, 784), row-major images,
        values in [0, 1] (background exactly 0).
    """
    _check_count(n_train, "make_curves: n_train")
    _check_count(n_test, "make_curves: n_test")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ProblemError(f"make_curves: seed must be a non-negative int, got {seed!r}")
    return _curves_split(n_train, seed, "train"), _curves_split(n_test, seed, "test")


# --------------------------------------------------------------------------------------------------------------
# File readers (all failures -> ProblemError with the file and the expected format)
# --------------------------------------------------------------------------------------------------------------


class _FileError(Exception):
    """Internal: a reason why a file cannot be used; turned into a ProblemError by load_problem."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(reason)
        self.path = path
        self.reason = reason


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.keys())
            if "x_train" not in keys or "x_test" not in keys:
                raise _FileError(path, f"arrays x_train and x_test not found (it has {keys})")
            return z["x_train"], z["x_test"]
    except _FileError:
        raise
    except Exception as e:  # BadZipFile, OSError, ValueError (pickled/object arrays), EOFError, ...
        raise _FileError(path, f"unreadable .npz ({type(e).__name__}: {_one_line(e)})") from e


_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_idx(path: Path) -> np.ndarray:
    """Read an idx file (LeCun's MNIST format; gzip detected from the magic bytes)."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except Exception as e:
        raise _FileError(path, f"unreadable ({type(e).__name__}: {_one_line(e)})") from e
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES or not 1 <= raw[3] <= 4:
        raise _FileError(path, "not an idx file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise _FileError(path, "truncated idx header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    need = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != need:
        raise _FileError(path, f"idx header says {dims} ({need} bytes) but the file has {len(raw)} bytes")
    if ndim != 3:
        raise _FileError(path, f"idx array of shape {dims} is not a stack of images (a label file?)")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


_IDX_TRAIN = ("train-images-idx3-ubyte", "train-images.idx3-ubyte")
_IDX_TEST = ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte")


def _find(directory: Path, stems: Sequence[str]) -> Path | None:
    for stem in stems:
        for cand in (directory / stem, directory / f"{stem}.gz"):
            if cand.is_file():
                return cand
    return None


def _read_mat(path: Path) -> dict[str, np.ndarray]:
    try:
        import scipy.io
    except ImportError:
        raise _FileError(
            path, "reading .mat files needs scipy, which fastcurv does not depend on: pip install scipy, or convert "
            "the file to .npz"
        ) from None
    try:
        return scipy.io.loadmat(str(path))
    except NotImplementedError as e:  # MATLAB v7.3 = HDF5
        raise _FileError(path, "MATLAB v7.3 (HDF5) files are not supported; re-save with -v7 or convert to .npz") from e
    except Exception as e:
        raise _FileError(path, f"unreadable .mat ({type(e).__name__}: {_one_line(e)})") from e


def _arrays_from_mat(name: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    mat = _read_mat(path)
    keys = sorted(k for k in mat if not k.startswith("__"))
    if "x_train" in mat and "x_test" in mat:
        return mat["x_train"], mat["x_test"]
    if name == "curves" and "bdata" in mat and "bdatatest" in mat:  # digs3pts_1.mat: (N, 784) each
        return mat["bdata"], mat["bdatatest"]
    if name == "mnist" and all(f"train{d}" in mat and f"test{d}" in mat for d in range(10)):  # mnist_all.mat
        return (
            np.concatenate([mat[f"train{d}"] for d in range(10)]),
            np.concatenate([mat[f"test{d}"] for d in range(10)]),
        )
    if name == "faces" and "newfaces_single" in mat:  # newfaces_rot_single.mat: (625, N), one face per column
        x = mat["newfaces_single"]
        if x.ndim != 2 or 625 not in x.shape:
            raise _FileError(path, f"newfaces_single has shape {x.shape}, expected (625, N)")
        x = x.T if x.shape[0] == 625 and x.shape[1] != 625 else x
        # The K-BFGS split of the 165,600 faces: the first 103,500 for training and the last 41,400 for testing
        # (the 20,700 in between unused); for other N the same fractions, 5/8 and 1/4.
        n = x.shape[0]
        n_tr, n_te = round(n * 103_500 / 165_600), round(n * 41_400 / 165_600)
        return x[:n_tr], x[n - n_te :]
    raise _FileError(path, f"no known arrays in this .mat (it has {keys})")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:200] + ("..." if len(text) > 200 else "")


def _read_data(name: str, data: DataPath) -> tuple[np.ndarray, np.ndarray, str]:
    """Dispatch on the form of ``data``; returns (x_train, x_test, source description)."""
    if isinstance(data, (str, Path)):
        path = Path(data).expanduser()
        if not path.exists():
            raise _FileError(path, "does not exist")
        if path.is_dir():
            if name != "mnist":
                raise _FileError(path, "is a directory; expected a file")
            train, test = _find(path, _IDX_TRAIN), _find(path, _IDX_TEST)
            if train is None or test is None:
                raise _FileError(path, "directory without train-images-idx3-ubyte[.gz] and t10k-images-idx3-ubyte[.gz]")
            return _read_idx(train), _read_idx(test), f"idx files in {path}"
        suffix = path.suffix.lower()
        if suffix == ".npz":
            return (*_read_npz(path), str(path))
        if suffix == ".mat":
            return (*_arrays_from_mat(name, path), str(path))
        if name == "mnist" and "idx" in path.name:  # the training-images file; find its test sibling
            test = _find(path.parent, _IDX_TEST)
            if test is None:
                raise _FileError(path, f"no t10k-images-idx3-ubyte[.gz] next to it in {path.parent}")
            return _read_idx(path), _read_idx(test), f"idx files {path.name}, {test.name} in {path.parent}"
        raise _FileError(path, f"unrecognised file type {suffix or '(no extension)'}")
    if isinstance(data, Sequence) and len(data) == 2 and all(isinstance(p, (str, Path)) for p in data):
        if name != "mnist":
            raise _FileError(str(data), "a (train, test) pair of files is only accepted for mnist idx files")
        paths = [Path(p).expanduser() for p in data]
        for p in paths:
            if not p.is_file():
                raise _FileError(p, "does not exist")
        return _read_idx(paths[0]), _read_idx(paths[1]), f"idx files {paths[0]}, {paths[1]}"
    raise _FileError(repr(data), f"data must be a path or a (train, test) pair of paths, got {type(data).__name__}")


def _as_images(x: np.ndarray, spec: _Spec, path: object, split: str) -> np.ndarray:
    """Validate one split's array and return it as (N, D) (dtype unchanged)."""
    if not isinstance(x, np.ndarray) or x.dtype.kind not in "biuf":
        kind = x.dtype if isinstance(x, np.ndarray) else type(x).__name__
        raise _FileError(path, f"{split} is not a real numeric array ({kind})")
    d, s = spec.layer_sizes[0], spec.side
    shape = x.shape
    rest = tuple(n for n in shape[1:] if n != 1)  # singleton (channel) axes dropped
    if x.ndim == 2 and shape[1] == d:
        pass
    elif x.ndim in (3, 4) and rest in ((s, s), (d,)):
        x = x.reshape(shape[0], d)
    else:
        hint = " (transposed? one image per row is expected)" if x.ndim == 2 and shape[0] == d else ""
        raise _FileError(path, f"{split} has shape {shape}, expected (N, {d}) or (N, {s}, {s}){hint}")
    if x.shape[0] == 0:
        raise _FileError(path, f"{split} is empty")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise _FileError(path, f"{split} contains NaN or inf")
    return x


def _scale(xs: list[np.ndarray], spec: _Spec, path: object) -> tuple[list[np.ndarray], str]:
    """Bring pixel values to the problem's convention (see the module docstring); decided jointly for both splits."""
    lo = min(float(x.min()) for x in xs)
    hi = max(float(x.max()) for x in xs)
    integral = all(x.dtype.kind in "biu" or bool(np.all(np.floor(x) == x)) for x in xs)
    as_int_pixels = integral and lo >= 0 and hi <= 255 and hi > 1
    if spec.loss == "bce":
        if lo >= 0 and hi <= 1:
            return [x.astype(np.float32) for x in xs], ""
        if as_int_pixels:
            return [(x.astype(np.float32) / 255.0) for x in xs], ", rescaled /255"
        raise _FileError(
            path,
            f"values in [{lo:g}, {hi:g}] but sigmoid cross-entropy needs [0, 1] (or integer pixels 0..255)",
        )
    if all(x.dtype.kind in "biu" for x in xs) and lo >= 0 and hi <= 255:
        return [(x.astype(np.float32) / 255.0) for x in xs], ", rescaled /255"
    return [x.astype(np.float32) for x in xs], ""


# --------------------------------------------------------------------------------------------------------------
# load_problem
# --------------------------------------------------------------------------------------------------------------


def _describe(name: str, spec: _Spec, source: str, n_tr: int, n_te: int) -> str:
    widths = "-".join(f"[{w}]" if i == spec.code_layer else str(w) for i, w in enumerate(spec.layer_sizes))
    return (
        f"{name.upper()} deep autoencoder: {n_tr} train / {n_te} test images of {spec.side}x{spec.side} "
        f"({source}); layers {widths} (code layer in brackets), ReLU except the code and output layers; "
        f"loss: {_LOSS_TEXT[spec.loss]}."
    )


def _subset(x: np.ndarray | Tensor, n: int | None, what: str, name: str):
    if n is None:
        return x
    if n > x.shape[0]:
        raise ProblemError(f"{name}: {what}={n} but only {x.shape[0]} examples are available")
    return x[:n]


def _load_digits(seed: int, n_train: int | None, n_test: int | None) -> tuple[Tensor, Tensor, str]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ProblemError(
            "digits: the 'digits' problem needs scikit-learn, which is an optional extra: "
            "pip install 'fastcurv[digits]'"
        ) from None
    x = np.asarray(load_digits().data, dtype=np.float32) / 16.0  # 1797 x 64, integer values 0..16
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed)).numpy()
    x = x[perm]
    n_tr_default = 1500
    n_tr = n_tr_default if n_train is None else n_train
    n_te = x.shape[0] - n_tr_default if n_test is None else n_test
    if n_tr + n_te > x.shape[0]:
        raise ProblemError(f"digits: n_train + n_test = {n_tr + n_te} exceeds the {x.shape[0]} images available")
    src = f"scikit-learn load_digits scaled by 1/16, shuffled with seed {seed}"
    return torch.from_numpy(x[:n_tr].copy()), torch.from_numpy(x[x.shape[0] - n_te :].copy()), src


def load_problem(
    name: str,
    *,
    data: DataPath | None = None,
    seed: int = 0,
    n_train: int | None = None,
    n_test: int | None = None,
) -> Problem:
    """Set up a benchmark problem: its data, autoencoder architecture and loss.

    Args:
        name: one of :data:`PROBLEMS` (case-insensitive): ``"curves"`` (generated by :func:`make_curves`, 20,000
            train / 10,000 test by default like the original, or read from ``data``), ``"digits"`` (scikit-learn's
            bundled 8x8 digits, 1,500 train / 297 test after a seeded shuffle), ``"mnist"`` and ``"faces"``
            (``data`` required).
        data: data file for mnist/faces (optional for curves): an ``.npz`` with ``x_train``/``x_test``, MNIST idx
            files (a directory, the training file, or a (train, test) pair), or an original ``.mat`` file (needs
            scipy). Not accepted for digits.
        seed: seed for generated data (curves) or the split (digits); unused for files.
        n_train, n_test: keep only the first ``n_train`` / ``n_test`` examples (for curves: how many to
            generate). ``None`` keeps the defaults above / everything in the file.

    Raises:
        ProblemError: unknown name, missing/unreadable/corrupt file, wrong shapes, empty splits, NaN/inf,
            values outside [0, 1] for a cross-entropy problem (integer pixels 0..255 are rescaled /255 instead),
            bad sizes — always a one-line message naming the file and the expected format.
    """
    if not isinstance(name, str) or name.strip().lower() not in _SPECS:
        raise ProblemError(f"unknown problem {name!r}; known problems: {', '.join(PROBLEMS)}")
    name = name.strip().lower()
    spec = _SPECS[name]
    _check_count(n_train, f"{name}: n_train", allow_none=True)
    _check_count(n_test, f"{name}: n_test", allow_none=True)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ProblemError(f"{name}: seed must be a non-negative int, got {seed!r}")

    if name == "digits":
        if data is not None:
            raise ProblemError("digits: the data come from scikit-learn; do not pass data=")
        train_x, test_x, source = _load_digits(seed, n_train, n_test)
    elif name == "curves" and data is None:
        train_x, test_x = make_curves(20000 if n_train is None else n_train, 10000 if n_test is None else n_test, seed)
        source = f"generated by fastcurv.data.make_curves, seed {seed}"
    else:
        if data is None:
            raise ProblemError(f"{name}: pass the data file with data=...; expected {spec.expected}")
        try:
            raw_train, raw_test, source = _read_data(name, data)
            xs = [_as_images(x, spec, source, split) for x, split in ((raw_train, "x_train"), (raw_test, "x_test"))]
            xs, note = _scale(xs, spec, source)
        except _FileError as e:
            raise ProblemError(f"{name}: cannot use {e.path}: {e.reason}; expected {spec.expected}") from None
        train_np = _subset(xs[0], n_train, "n_train", name)
        test_np = _subset(xs[1], n_test, "n_test", name)
        train_x = torch.from_numpy(np.ascontiguousarray(train_np, dtype=np.float32))
        test_x = torch.from_numpy(np.ascontiguousarray(test_np, dtype=np.float32))
        source += note

    return Problem(
        name=name,
        train_x=train_x,
        test_x=test_x,
        layer_sizes=list(spec.layer_sizes),
        loss=spec.loss,
        code_layer=spec.code_layer,
        description=_describe(name, spec, source, train_x.shape[0], test_x.shape[0]),
    )
