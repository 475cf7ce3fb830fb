"""NewtonCG and BlockHF on models as users write them: BatchNorm (train and eval), buffers read in the
forward (a BERT-like embedding with ``position_ids``/``token_type_ids``), and ``nn.TransformerEncoder``
(scaled dot-product attention, whose fused CPU kernel has no double backward)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastcurv import hvp as H
from fastcurv.optim import BlockHF, NewtonCG

OPTIMIZERS = {
    "newton-cg-ggn": lambda m: NewtonCG(m, F.cross_entropy, method="ggn", max_cg_iters=3),
    "newton-cg-double-backward": lambda m: NewtonCG(m, F.cross_entropy, method="double-backward", max_cg_iters=3),
    "block-hf": lambda m: BlockHF(m, F.cross_entropy, max_cg_iters=3),
}


class _BertLike(nn.Module):
    """Token + position + segment embeddings (positions and segments are buffers, as in BERT), LayerNorm,
    one post-norm encoder layer, mean pooling, a linear head."""

    def __init__(self, vocab: int = 11, length: int = 6, d: int = 8) -> None:
        super().__init__()
        self.tok, self.pos, self.seg = nn.Embedding(vocab, d), nn.Embedding(length, d), nn.Embedding(2, d)
        self.register_buffer("position_ids", torch.arange(length).expand(1, -1), persistent=False)
        self.register_buffer("token_type_ids", torch.zeros(1, length, dtype=torch.long), persistent=False)
        self.norm = nn.LayerNorm(d)
        self.enc = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]
        h = self.tok(ids) + self.pos(self.position_ids[:, :n]) + self.seg(self.token_type_ids[:, :n])
        return self.head(self.enc(self.norm(h)).mean(1))


class _Encoder(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=True), 1)
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x).mean(1))


def _batchnorm_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))


MODELS = {
    "batchnorm": (_batchnorm_mlp, lambda: torch.randn(16, 4)),
    "bert-like": (_BertLike, lambda: torch.randint(0, 11, (6, 6))),
    "transformer-encoder": (_Encoder, lambda: torch.randn(6, 4, 8)),
}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_steps_on_models_with_buffers_and_attention(opt: str, model: str, train: bool) -> None:
    make, inputs = MODELS[model]
    m = make().train(train)
    x = inputs()
    y = torch.randint(0, 3, (x.shape[0],))
    before = [p.detach().clone() for p in m.parameters()]
    o = OPTIMIZERS[opt](m)
    assert torch.isfinite(o.step(batch=(x, y)))
    assert any(not torch.equal(a, p) for a, p in zip(before, m.parameters())), "no parameter moved"
    assert all(torch.isfinite(p).all() for p in m.parameters())
