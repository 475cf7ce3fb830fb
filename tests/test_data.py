"""Tests for fastcurv.data: the CURVES generator, problem definitions (models, losses) and data-file loading."""

from __future__ import annotations

import gzip
import math
import struct
import sys
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fastcurv.data import PROBLEMS, Problem, ProblemError, load_problem, make_curves

ARCH = {
    "mnist": [784, 1000, 500, 250, 30, 250, 500, 1000, 784],
    "faces": [625, 2000, 1000, 500, 30, 500, 1000, 2000, 625],
    "curves": [784, 400, 200, 100, 50, 25, 6, 25, 50, 100, 200, 400, 784],
    "digits": [64, 100, 50, 25, 8, 25, 50, 100, 64],
}


# ---------------------------------------------------------------------------------------------------- helpers


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _write_npz(path: Path, x_train: np.ndarray, x_test: np.ndarray) -> Path:
    np.savez(path, x_train=x_train, x_test=x_test)
    return path


def _idx_bytes(arr: np.ndarray) -> bytes:
    assert arr.dtype == np.uint8
    return struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def _write_idx(path: Path, arr: np.ndarray, *, gz: bool = False) -> Path:
    data = _idx_bytes(arr)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def _mnist_like(n: int, seed: int = 0) -> np.ndarray:
    return _rng(seed).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


def _load_error(name: str, **kw) -> str:
    with pytest.raises(ProblemError) as ei:
        load_problem(name, **kw)
    msg = str(ei.value)
    assert "\n" not in msg, "error messages are one line"
    return msg


def _components(img: np.ndarray) -> int:
    """Number of 8-connected components of the inked pixels of a 2-D image."""
    ink = img > 0
    seen = np.zeros_like(ink)
    count = 0
    for i, j in zip(*np.nonzero(ink)):
        if seen[i, j]:
            continue
        count += 1
        queue = deque([(i, j)])
        seen[i, j] = True
        while queue:
            a, b = queue.popleft()
            for da in (-1, 0, 1):
                for db in (-1, 0, 1):
                    u, v = a + da, b + db
                    if 0 <= u < img.shape[0] and 0 <= v < img.shape[1] and ink[u, v] and not seen[u, v]:
                        seen[u, v] = True
                        queue.append((u, v))
    return count


# ---------------------------------------------------------------------------------------------------- CURVES


def test_curves_shapes_dtype_range():
    tr, te = make_curves(300, 70, seed=0)
    assert tr.shape == (300, 784) and te.shape == (70, 784)
    assert tr.dtype == te.dtype == torch.float32
    for x in (tr, te):
        assert torch.isfinite(x).all()
        assert x.min() >= 0 and x.max() <= 1


def test_curves_deterministic_and_seed_dependent():
    a_tr, a_te = make_curves(50, 20, seed=3)
    b_tr, b_te = make_curves(50, 20, seed=3)
    c_tr, c_te = make_curves(50, 20, seed=4)
    assert torch.equal(a_tr, b_tr) and torch.equal(a_te, b_te)
    assert not torch.equal(a_tr, c_tr) and not torch.equal(a_te, c_te)
    # every image differs, not only some
    assert ((a_tr - c_tr).abs().sum(1) > 0).all()


def test_curves_prefix_property_and_independent_splits():
    small_tr, small_te = make_curves(10, 5, seed=1)
    big_tr, big_te = make_curves(600, 300, seed=1)  # crosses block boundaries (256)
    assert torch.equal(small_tr, big_tr[:10]) and torch.equal(small_te, big_te[:5])
    # the test split does not depend on n_train and differs from the training split
    _, te2 = make_curves(1, 300, seed=1)
    assert torch.equal(te2, big_te)
    assert not torch.equal(big_tr[:300], big_te)


def test_curves_not_trivial():
    tr, _ = make_curves(500, 1, seed=0)
    ink = tr.sum(1)
    assert (ink > 5).all(), "every image has a stroke"
    grey = ((tr > 0) & (tr < 1)).float().mean()
    full = (tr == 1).float().mean()
    assert grey > 0.02 and full > 0.01, "anti-aliased: both grey and full-ink pixels"
    mean = tr.mean()
    assert 0.02 < mean < 0.3, f"mostly background, some ink (mean {mean:.3f})"
    # images vary: no two identical, and together they ink the whole frame inside the 2-px margin
    assert torch.unique(tr, dim=0).shape[0] == 500
    covered = (tr > 0).any(0).view(28, 28)
    assert covered[2:26, 2:26].all()


def test_curves_strokes_are_connected_curves():
    tr, _ = make_curves(60, 1, seed=2)
    imgs = tr.view(-1, 28, 28).numpy()
    assert all(_components(img) == 1 for img in imgs), "each image is one continuous stroke"
    # a curve, not a blob: the inked area is far smaller than its bounding box for most images
    thin = 0
    for img in imgs:
        rows, cols = np.nonzero(img > 0.5)
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        thin += (img > 0.5).sum() < 0.8 * box
    assert thin >= 40


def test_curves_geometry_follows_the_documented_recipe():
    from fastcurv import data as D

    ctrl = D._control_points(5, 0, 0)
    assert ctrl.shape == (D._BLOCK, 3, 2)
    assert ctrl.min() >= D._MARGIN and ctrl.max() <= D._SIDE - 1 - D._MARGIN
    d01 = np.linalg.norm(ctrl[:, 0] - ctrl[:, 1], axis=1)
    d12 = np.linalg.norm(ctrl[:, 1] - ctrl[:, 2], axis=1)
    d02 = np.linalg.norm(ctrl[:, 0] - ctrl[:, 2], axis=1)
    assert min(d01.min(), d12.min(), d02.min()) >= D._MIN_DIST
    assert (d02 >= np.maximum(d01, d12)).all(), "the middle point is opposite the longest side"
    k = 4001
    s = D._spline_samples(ctrl.astype(np.float64), k)
    # interpolates: starts at P0, ends at P2, passes through P1
    assert np.allclose(s[:, 0], ctrl[:, 0]) and np.allclose(s[:, -1], ctrl[:, 2])
    spacing = np.linalg.norm(np.diff(s, axis=1), axis=-1).max()
    assert (np.linalg.norm(s - ctrl[:, 1:2], axis=-1).min(axis=1) <= spacing).all()
    # natural end conditions: second differences vanish at both ends, and the curve is C2 (no kinks)
    dd = np.diff(s, n=2, axis=1) / (1.0 / (k - 1)) ** 2
    scale = np.abs(dd).max()
    assert np.abs(dd[:, 0]).max() < 1e-2 * scale and np.abs(dd[:, -1]).max() < 1e-2 * scale
    assert np.abs(np.diff(dd, axis=1)).max() < 1e-2 * scale


def test_curves_do_not_touch_global_rng():
    torch_state = torch.get_rng_state()
    np_state = np.random.get_state()[1].copy()
    make_curves(5, 5, seed=0)
    assert torch.equal(torch_state, torch.get_rng_state())
    assert np.array_equal(np_state, np.random.get_state()[1])


@pytest.mark.parametrize(
    "kw", [dict(n_train=0), dict(n_test=0), dict(n_train=-3), dict(n_train=2.5), dict(n_train=True), dict(seed=-1),
           dict(seed=1.0)]
)
def test_curves_bad_arguments(kw):
    args = dict(n_train=5, n_test=5, seed=0) | kw
    with pytest.raises(ProblemError):
        make_curves(**args)


def test_load_curves_default_sizes_and_shrinking():
    p = load_problem("curves")
    assert p.train_x.shape == (20000, 784) and p.test_x.shape == (10000, 784)
    assert p.loss == "bce" and p.layer_sizes == ARCH["curves"] and p.code_layer == 6
    q = load_problem("CURVES", n_train=100, n_test=40, seed=0)
    assert torch.equal(q.train_x, p.train_x[:100]) and torch.equal(q.test_x, p.test_x[:40])
    assert "curves" in q.description.lower() and "100 train" in q.description


# ---------------------------------------------------------------------------------------------------- losses


def _problem(loss: str, d: int = 6) -> Problem:
    x = torch.rand(4, d)
    return Problem("toy", x, x, [d, 3, 2, 3, d], loss, 2, "toy")


def test_bce_loss_matches_hand_computation():
    p = _problem("bce")
    z = torch.randn(5, 6, dtype=torch.float64) * 3
    t = torch.rand(5, 6, dtype=torch.float64)
    s = torch.sigmoid(z)
    hand = -(t * torch.log(s) + (1 - t) * torch.log(1 - s)).sum() / 5
    assert torch.allclose(p.loss_fn(z, t), hand, rtol=1e-12, atol=0)
    # one example, all pixels: z = 0 gives log 2 per pixel whatever the target
    assert math.isclose(p.loss_fn(torch.zeros(1, 6), torch.rand(1, 6)).item(), 6 * math.log(2), rel_tol=1e-6)


def test_mse_loss_matches_hand_computation():
    p = _problem("mse")
    z = torch.randn(5, 6, dtype=torch.float64)
    t = torch.randn(5, 6, dtype=torch.float64)
    hand = sum(0.5 * (z[n, j] - t[n, j]) ** 2 for n in range(5) for j in range(6)) / 5
    assert torch.allclose(p.loss_fn(z, t), hand, rtol=1e-12, atol=0)
    assert p.loss_fn(t, t).item() == 0.0


@pytest.mark.parametrize("loss", ["bce", "mse"])
def test_loss_reduction_sum_over_pixels_mean_over_batch(loss):
    p = _problem(loss)
    z, t = torch.randn(3, 6), torch.rand(3, 6)
    base = p.loss_fn(z, t)
    assert base.ndim == 0
    # duplicating the batch leaves the loss unchanged (mean over examples) ...
    assert torch.allclose(p.loss_fn(torch.cat([z, z]), torch.cat([t, t])), base)
    # ... duplicating the pixels doubles it (sum over pixels)
    p12 = _problem(loss, d=12)
    assert torch.allclose(p12.loss_fn(torch.cat([z, z], 1), torch.cat([t, t], 1)), 2 * base)
    # and it is differentiable
    z.requires_grad_(True)
    p.loss_fn(z, t).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()


def test_loss_shape_mismatch():
    p = _problem("bce")
    with pytest.raises(ValueError, match="same shape"):
        p.loss_fn(torch.zeros(2, 6), torch.zeros(3, 6))
    with pytest.raises(ValueError, match="same shape"):
        p.loss_fn(torch.zeros(6), torch.zeros(6))


# ---------------------------------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def file_problems(tmp_path_factory) -> dict[str, Problem]:
    d = tmp_path_factory.mktemp("probs")
    rng = _rng(1)
    mnist = _write_npz(d / "m.npz", rng.random((6, 784), dtype=np.float32), rng.random((3, 784), dtype=np.float32))
    faces = _write_npz(d / "f.npz", rng.normal(size=(6, 625)), rng.normal(size=(3, 625)))
    return {
        "mnist": load_problem("mnist", data=mnist),
        "faces": load_problem("faces", data=faces),
        "curves": load_problem("curves", n_train=8, n_test=4),
    }


def _expected_modules(sizes: list[int], code: int) -> list[str]:
    out = []
    for i in range(len(sizes) - 1):
        out.append(f"Linear({sizes[i]},{sizes[i + 1]})")
        if i + 1 not in (code, len(sizes) - 1):
            out.append("ReLU")
    return out


def _describe_modules(model: nn.Sequential) -> list[str]:
    out = []
    for m in model:
        if isinstance(m, nn.Linear):
            assert m.bias is not None
            out.append(f"Linear({m.in_features},{m.out_features})")
        else:
            assert isinstance(m, nn.ReLU), type(m)
            out.append("ReLU")
    return out


@pytest.mark.parametrize("name", ["mnist", "faces", "curves"])
def test_models_layer_sizes_and_activations(file_problems, name):
    p = file_problems[name]
    code = ARCH[name].index(min(ARCH[name]))
    assert p.layer_sizes == ARCH[name] and p.code_layer == code
    model = p.build_model(seed=0)
    assert _describe_modules(model) == _expected_modules(ARCH[name], code)
    # the code layer and the output are linear: they can go negative, the ReLU layers cannot
    x = p.train_x[:4]
    h = x
    n_lin = 0
    for m in model:
        h = m(h)
        if isinstance(m, nn.Linear):
            n_lin += 1
    assert h.shape == x.shape
    assert (h < 0).any()
    encoder = nn.Sequential(*list(model)[: 2 * code - 1])  # Linear/ReLU pairs, then the code Linear
    assert isinstance(list(encoder)[-1], nn.Linear) and list(encoder)[-1].out_features == min(ARCH[name])
    assert (encoder(x) < 0).any()
    loss = p.loss_fn(model(x), x)
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_model_init_documented_distribution_and_determinism(file_problems):
    p = file_problems["curves"]
    torch_state = torch.get_rng_state()
    m0, m0b, m1 = p.build_model(0), p.build_model(0), p.build_model(1)
    assert torch.equal(torch_state, torch.get_rng_state()), "global RNG untouched"
    for a, b, c in zip(m0.parameters(), m0b.parameters(), m1.parameters()):
        assert torch.equal(a, b) and not torch.equal(a, c)
    for lin in (m for m in m0 if isinstance(m, nn.Linear)):
        bound = 1 / math.sqrt(lin.in_features)
        for t in (lin.weight, lin.bias):
            assert t.abs().max() <= bound
        w = lin.weight.detach()
        if w.numel() >= 5000:  # U(-b, b): mean 0, variance b^2 / 3
            assert abs(w.mean().item()) < 0.05 * bound
            assert math.isclose(w.var().item(), bound**2 / 3, rel_tol=0.1)
    m64 = p.build_model(0, dtype=torch.float64)
    for a, b in zip(m0.parameters(), m64.parameters()):
        assert b.dtype == torch.float64 and torch.equal(a.double(), b)


def test_build_model_bad_arguments(file_problems):
    p = file_problems["curves"]
    with pytest.raises(TypeError):
        p.build_model(0, dtype=torch.int64)
    with pytest.raises(TypeError):
        p.build_model("0")


def test_problem_validates_its_fields():
    x = torch.rand(4, 6)
    with pytest.raises(ProblemError):
        Problem("p", x, x, [6, 3, 5], "bce", 1, "first != last")
    with pytest.raises(ProblemError):
        Problem("p", x, x, [6, 3, 6], "l1", 1, "bad loss")
    with pytest.raises(ProblemError):
        Problem("p", x, x, [6, 3, 6], "bce", 2, "code layer is the output")
    with pytest.raises(ProblemError):
        Problem("p", x.double(), x, [6, 3, 6], "bce", 1, "float64 data")
    with pytest.raises(ProblemError):
        Problem("p", x, x[:0], [6, 3, 6], "bce", 1, "empty")
    with pytest.raises(ProblemError):
        Problem("p", x, torch.rand(4, 5), [6, 3, 6], "bce", 1, "wrong width")


# ---------------------------------------------------------------------------------------------------- digits


def test_digits_loads_when_sklearn_present():
    pytest.importorskip("sklearn", reason="scikit-learn is the optional 'digits' extra")
    p = load_problem("digits")
    assert p.train_x.shape == (1500, 64) and p.test_x.shape == (297, 64)
    assert p.loss == "bce" and p.layer_sizes == ARCH["digits"] and p.code_layer == 4
    both = torch.cat([p.train_x, p.test_x])
    assert both.min() == 0 and both.max() == 1
    assert torch.unique(both, dim=0).shape[0] > 1700  # train and test are disjoint rows of the 1797 images
    assert torch.equal(load_problem("digits").train_x, p.train_x)
    assert not torch.equal(load_problem("digits", seed=1).train_x, p.train_x)
    small = load_problem("digits", n_train=100, n_test=50)
    assert small.train_x.shape == (100, 64) and small.test_x.shape == (50, 64)
    assert torch.equal(small.train_x, p.train_x[:100])
    model = p.build_model(0)
    assert _describe_modules(model) == _expected_modules(ARCH["digits"], 4)
    assert "exceeds" in _load_error("digits", n_train=1000, n_test=900)
    assert "data" in _load_error("digits", data="x.npz")


def test_digits_without_sklearn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    msg = _load_error("digits")
    assert "pip install 'fastcurv[digits]'" in msg and "scikit-learn" in msg


# ----------------------------------------------------------------------------------------------- MNIST / FACES files


def test_mnist_npz_flat_float(tmp_path):
    tr, te = _rng().random((7, 784), dtype=np.float32), _rng(1).random((3, 784), dtype=np.float32)
    p = load_problem("mnist", data=_write_npz(tmp_path / "m.npz", tr, te))
    assert torch.equal(p.train_x, torch.from_numpy(tr)) and torch.equal(p.test_x, torch.from_numpy(te))
    assert p.layer_sizes == ARCH["mnist"] and p.loss == "bce" and p.code_layer == 4
    assert str(tmp_path / "m.npz") in p.description


@pytest.mark.parametrize("shape", [(5, 28, 28), (5, 1, 28, 28), (5, 28, 28, 1)])
def test_mnist_npz_uint8_images_rescaled(tmp_path, shape):
    tr = _rng().integers(0, 256, size=shape, dtype=np.uint8)
    te = _rng(1).integers(0, 256, size=(2, 28, 28), dtype=np.uint8)
    p = load_problem("mnist", data=str(_write_npz(tmp_path / "m.npz", tr, te)))
    assert p.train_x.shape == (5, 784) and p.test_x.shape == (2, 784)
    assert torch.allclose(p.train_x, torch.from_numpy(tr.reshape(5, 784).astype(np.float32) / 255))
    assert "/255" in p.description


def test_mnist_integer_valued_floats_rescaled_jointly(tmp_path):
    tr = _rng().integers(0, 256, size=(4, 784)).astype(np.float64)
    te = np.ones((2, 784))  # in [0, 1] alone, but the file is 0..255 data: scaled too
    p = load_problem("mnist", data=_write_npz(tmp_path / "m.npz", tr, te))
    assert torch.allclose(p.test_x, torch.full((2, 784), 1 / 255))
    assert p.train_x.max() <= 1


def test_mnist_binary_uint8_kept(tmp_path):
    tr = _rng().integers(0, 2, size=(4, 784), dtype=np.uint8)
    p = load_problem("mnist", data=_write_npz(tmp_path / "m.npz", tr, tr[:2]))
    assert set(p.train_x.unique().tolist()) == {0.0, 1.0}


def test_mnist_idx_directory_file_and_pair(tmp_path):
    tr, te = _mnist_like(6), _mnist_like(4, seed=1)
    d = tmp_path / "raw"
    d.mkdir()
    _write_idx(d / "train-images-idx3-ubyte.gz", tr, gz=True)
    _write_idx(d / "t10k-images-idx3-ubyte", te)
    _write_idx(d / "train-labels-idx1-ubyte", np.arange(6, dtype=np.uint8))  # ignored
    expect_tr = torch.from_numpy(tr.reshape(6, 784).astype(np.float32) / 255)
    expect_te = torch.from_numpy(te.reshape(4, 784).astype(np.float32) / 255)
    pair = (d / "train-images-idx3-ubyte.gz", d / "t10k-images-idx3-ubyte")
    for data in (d, str(d), d / "train-images-idx3-ubyte.gz", pair):
        p = load_problem("mnist", data=data)
        assert torch.allclose(p.train_x, expect_tr) and torch.allclose(p.test_x, expect_te)
    p = load_problem("mnist", data=d, n_train=2, n_test=1)
    assert torch.allclose(p.train_x, expect_tr[:2]) and torch.allclose(p.test_x, expect_te[:1])


def test_mnist_mat_when_scipy_present(tmp_path):
    sio = pytest.importorskip("scipy.io", reason="scipy is optional: .mat files are read only when it is installed")
    arrays = {f"train{d}": _rng(d).integers(0, 256, (2, 784), dtype=np.uint8) for d in range(10)}
    arrays |= {f"test{d}": _rng(10 + d).integers(0, 256, (1, 784), dtype=np.uint8) for d in range(10)}
    sio.savemat(tmp_path / "mnist_all.mat", arrays)
    p = load_problem("mnist", data=tmp_path / "mnist_all.mat")
    assert p.train_x.shape == (20, 784) and p.test_x.shape == (10, 784)
    assert torch.allclose(p.train_x[:2], torch.from_numpy(arrays["train0"] / 255).float())


def test_faces_npz_real_valued_kept(tmp_path):
    tr, te = _rng().normal(size=(5, 25, 25)) * 3, _rng(1).normal(size=(2, 625))
    p = load_problem("faces", data=_write_npz(tmp_path / "f.npz", tr, te))
    assert p.loss == "mse" and p.layer_sizes == ARCH["faces"] and p.code_layer == 4
    assert torch.allclose(p.train_x, torch.from_numpy(tr.reshape(5, 625)).float())
    assert p.train_x.min() < 0 and p.train_x.max() > 1  # no [0, 1] requirement for the squared error
    u8 = _rng().integers(0, 256, (3, 625), dtype=np.uint8)
    q = load_problem("faces", data=_write_npz(tmp_path / "u.npz", u8, u8))
    assert q.train_x.max() <= 1


def test_faces_mat_when_scipy_present(tmp_path):
    sio = pytest.importorskip("scipy.io", reason="scipy is optional: .mat files are read only when it is installed")
    x = _rng().normal(size=(625, 16))  # one face per column, as in newfaces_rot_single.mat
    sio.savemat(tmp_path / "newfaces_rot_single.mat", {"newfaces_single": x})
    p = load_problem("faces", data=tmp_path / "newfaces_rot_single.mat")
    # K-BFGS split: first 5/8 for training, last 1/4 for testing
    assert torch.allclose(p.train_x, torch.from_numpy(x.T[:10]).float())
    assert torch.allclose(p.test_x, torch.from_numpy(x.T[12:]).float())


def test_curves_from_file(tmp_path):
    sio = pytest.importorskip("scipy.io", reason="scipy is optional: .mat files are read only when it is installed")
    tr, te = _rng().random((4, 784)), _rng(1).random((2, 784))
    sio.savemat(tmp_path / "digs3pts_1.mat", {"bdata": tr, "bdatatest": te})
    p = load_problem("curves", data=tmp_path / "digs3pts_1.mat")
    assert torch.allclose(p.train_x, torch.from_numpy(tr).float()) and p.test_x.shape == (2, 784)


# ---------------------------------------------------------------------------------------------------- error paths


def test_unknown_problem():
    msg = _load_error("cifar")
    assert "cifar" in msg and all(n in msg for n in PROBLEMS)
    _load_error(3)


def test_missing_data_argument():
    for name in ("mnist", "faces"):
        msg = _load_error(name)
        assert "data=" in msg and ".npz" in msg


def test_missing_file(tmp_path):
    msg = _load_error("mnist", data=tmp_path / "nope.npz")
    assert "nope.npz" in msg and "does not exist" in msg and "x_train" in msg


def test_directory_without_idx_files(tmp_path):
    msg = _load_error("mnist", data=tmp_path)
    assert str(tmp_path) in msg and "t10k-images-idx3-ubyte" in msg
    assert "directory" in _load_error("faces", data=tmp_path)


def test_corrupt_and_unreadable_files(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"this is not a zip file at all")
    assert "bad.npz" in _load_error("mnist", data=bad)
    # a truncated real npz
    good = _write_npz(tmp_path / "good.npz", np.zeros((2, 784)), np.zeros((2, 784)))
    cut = tmp_path / "cut.npz"
    cut.write_bytes(good.read_bytes()[:200])
    assert "cut.npz" in _load_error("mnist", data=cut)
    # object arrays would need pickle: refused
    obj = tmp_path / "obj.npz"
    np.savez(obj, x_train=np.array([None, 1], dtype=object), x_test=np.zeros((1, 784)))
    assert "obj.npz" in _load_error("mnist", data=obj)
    # unknown extension
    txt = tmp_path / "data.csv"
    txt.write_text("1,2,3")
    assert "data.csv" in _load_error("faces", data=txt)
    # bad type for data
    assert "path" in _load_error("mnist", data=123)


def test_npz_missing_keys(tmp_path):
    path = tmp_path / "k.npz"
    np.savez(path, train=np.zeros((2, 784)), test=np.zeros((2, 784)))
    msg = _load_error("mnist", data=path)
    assert "x_train" in msg and "'train'" in msg


@pytest.mark.parametrize(
    "name,shape",
    [("mnist", (3, 100)), ("mnist", (3, 27, 27)), ("mnist", (784, 3)), ("faces", (3, 784)), ("faces", (3, 28, 28)),
     ("mnist", (784,)), ("curves", (3, 2, 28, 28))],
)
def test_wrong_shapes(tmp_path, name, shape):
    path = _write_npz(tmp_path / "s.npz", np.zeros(shape), np.zeros((2, ARCH[name][0])))
    msg = _load_error(name, data=path)
    assert "s.npz" in msg and str(shape) in msg
    d = ARCH[name][0]
    assert f"(N, {d})" in msg
    if shape == (784, 3):
        assert "transposed" in msg


def test_empty_split(tmp_path):
    path = _write_npz(tmp_path / "e.npz", np.zeros((3, 784)), np.zeros((0, 784)))
    assert "empty" in _load_error("mnist", data=path)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite(tmp_path, bad):
    tr = np.zeros((3, 625))
    tr[1, 7] = bad
    path = _write_npz(tmp_path / "n.npz", tr, np.zeros((2, 625)))
    assert "NaN or inf" in _load_error("faces", data=path)


@pytest.mark.parametrize(
    "values",
    [
        np.full((2, 784), 1.5),
        np.full((2, 784), -0.2),
        np.full((2, 784), 300.0),
        np.full((2, 784), 1000, dtype=np.uint16),
        np.full((2, 784), -1, dtype=np.int8),
    ],
)
def test_out_of_range_for_bce(tmp_path, values):
    path = _write_npz(tmp_path / "r.npz", values, np.zeros((2, 784)))
    msg = _load_error("mnist", data=path)
    assert "r.npz" in msg and "[0, 1]" in msg


def test_non_numeric_array(tmp_path):
    path = _write_npz(tmp_path / "c.npz", np.zeros((2, 784), dtype=np.complex64), np.zeros((2, 784)))
    assert "numeric" in _load_error("mnist", data=path)


def test_bad_idx_files(tmp_path):
    te = _write_idx(tmp_path / "t10k-images-idx3-ubyte", _mnist_like(2))
    tr = tmp_path / "train-images-idx3-ubyte"
    tr.write_bytes(b"\x12\x34\x56\x78" + b"\x00" * 100)  # bad magic
    assert "magic" in _load_error("mnist", data=tr)
    full = _idx_bytes(_mnist_like(3))
    tr.write_bytes(full[:-10])  # truncated payload
    assert "bytes" in _load_error("mnist", data=(tr, te))
    tr.write_bytes(full[:9])  # truncated header
    assert "train-images-idx3-ubyte" in _load_error("mnist", data=tmp_path)
    _write_idx(tr, np.arange(5, dtype=np.uint8))  # a label file in place of images
    assert "label" in _load_error("mnist", data=tmp_path)
    gz = tmp_path / "train-images-idx3-ubyte.gz"
    gz.write_bytes(b"\x1f\x8b" + b"garbage" * 10)  # broken gzip stream
    tr.unlink()
    assert "train-images-idx3-ubyte.gz" in _load_error("mnist", data=tmp_path)
    # the training file given alone, but no test file next to it
    lone = tmp_path / "lone"
    lone.mkdir()
    _write_idx(lone / "train-images-idx3-ubyte", _mnist_like(2))
    assert "t10k" in _load_error("mnist", data=lone / "train-images-idx3-ubyte")
    # a pair with a missing member; pairs only for mnist
    assert "does not exist" in _load_error("mnist", data=(te, tmp_path / "missing"))
    assert "pair" in _load_error("faces", data=(te, te))


def test_mat_without_scipy(tmp_path, monkeypatch):
    path = tmp_path / "newfaces_rot_single.mat"
    path.write_bytes(b"MATLAB 5.0 MAT-file")
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    msg = _load_error("faces", data=path)
    assert "scipy" in msg and "newfaces_rot_single.mat" in msg and ".npz" in msg


def test_bad_mat_files(tmp_path):
    sio = pytest.importorskip("scipy.io", reason="scipy is optional: .mat files are read only when it is installed")
    junk = tmp_path / "junk.mat"
    junk.write_bytes(b"\x00" * 50)
    assert "junk.mat" in _load_error("curves", data=junk)
    sio.savemat(tmp_path / "other.mat", {"something": np.zeros((2, 2))})
    msg = _load_error("mnist", data=tmp_path / "other.mat")
    assert "something" in msg and "mnist_all.mat" in msg


@pytest.mark.parametrize(
    "kw,fragment",
    [(dict(n_train=10), "n_train=10"), (dict(n_test=5), "n_test=5"), (dict(n_train=0), "n_train"),
     (dict(n_test=-1), "n_test"), (dict(n_train=1.5), "n_train"), (dict(seed=-2), "seed")],
)
def test_bad_sizes(tmp_path, kw, fragment):
    path = _write_npz(tmp_path / "z.npz", np.zeros((4, 784)), np.zeros((2, 784)))
    assert fragment in _load_error("mnist", data=path, **kw)
