"""The language-model problem (fastcurv.lm): pinned corpus, split, tokens, batches, model structure."""

from __future__ import annotations

import shutil

import pytest
import torch

from fastcurv import lm


@pytest.fixture(scope="module")
def problem() -> lm.LMProblem:
    return lm.load_lm("small")


def test_corpus_is_pinned_and_complete(problem):
    texts, missing = lm._read_corpus()
    assert missing == [] and len(texts) == len(lm.CORPUS)
    n = sum(len(t.replace("\t", "    ")) for t in texts)
    assert problem.train_tokens.numel() + problem.test_tokens.numel() == n
    # 90/10 split per file
    assert 0.88 < problem.train_tokens.numel() / n < 0.92
    assert problem.train_tokens.dtype == torch.int64 and int(problem.train_tokens.max()) < len(lm.VOCAB)


def test_encode_decode_round_trip():
    s = "def f(x):\n    return x + 1  # é\t"
    assert lm.decode(lm.encode(s)) == "def f(x):\n    return x + 1  # ?    "
    assert len(lm.VOCAB) == 96 and len(set(lm.VOCAB)) == 96


def test_changed_or_missing_files_are_left_out_with_a_warning(tmp_path):
    root = lm._stdlib_dir()
    for rel, _ in lm.CORPUS:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / rel, tmp_path / rel)
    (tmp_path / "pyclbr.py").write_text("changed")
    (tmp_path / "_py_abc.py").unlink()
    with pytest.warns(UserWarning, match=r"pyclbr\.py.*_py_abc\.py|_py_abc\.py.*pyclbr\.py"):
        p = lm.load_lm(root=tmp_path)
    assert "18 standard-library modules" in p.description
    for rel, _ in lm.CORPUS[:12]:  # most of the bytes gone: an error, not a silently different problem
        (tmp_path / rel).unlink(missing_ok=True)
    with pytest.raises(lm.ProblemError, match="only .* characters of the corpus verified"):
        lm.load_lm(root=tmp_path)


def test_bad_arguments(problem):
    with pytest.raises(lm.ProblemError, match="unknown size"):
        lm.load_lm("huge")
    with pytest.raises(ValueError, match="split"):
        problem.batch("valid")
    with pytest.raises(ValueError, match="batch_size"):
        problem.batch(batch_size=0)
    with pytest.raises(ValueError, match="logits"):
        problem.loss_fn(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))


def test_batches_are_windows_with_shifted_targets(problem):
    g = torch.Generator().manual_seed(0)
    x, y = problem.batch(batch_size=5, generator=g)
    assert x.shape == y.shape == (5, problem.block_size)
    assert torch.equal(x[:, 1:], y[:, :-1])
    x2, _ = problem.batch(batch_size=5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)


def test_model_is_causal_tied_and_reproducible(problem):
    m = problem.build_model(seed=3, dtype=torch.float64)
    assert torch.equal(problem.build_model(seed=3).tok.weight, m.tok.weight.float())
    x, y = problem.batch(batch_size=2, generator=torch.Generator().manual_seed(1))
    out = m(x)
    assert out.shape == (2, problem.block_size, len(lm.VOCAB)) and out.dtype == torch.float64
    x2 = x.clone()
    x2[:, 40:] = (x2[:, 40:] + 7) % len(lm.VOCAB)
    out2 = m(x2)
    torch.testing.assert_close(out2[:, :40], out[:, :40], rtol=1e-12, atol=1e-12)  # the past ignores the future
    assert (out2[:, 40:] - out[:, 40:]).abs().max() > 1e-6
    # tied head: logits are the final features times the token embedding
    head_grad = torch.autograd.grad(problem.loss_fn(out, y), m.tok.weight)[0]
    assert head_grad.abs().sum() > 0
    assert not any(n.startswith("head") for n, _ in m.named_parameters())
    # initial loss is about log(V) (GPT-2 initialisation: near-uniform predictions)
    assert abs(float(problem.loss_fn(out, y).detach()) - torch.log(torch.tensor(96.0)).item()) < 0.3


def test_adam_learns_it(problem):
    torch.manual_seed(0)
    m = problem.build_model(seed=0)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    first = None
    for _ in range(25):
        x, y = problem.batch(batch_size=8, generator=g)
        loss = problem.loss_fn(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = float(loss.detach()) if first is None else first
    assert float(loss.detach()) < first - 1.0
