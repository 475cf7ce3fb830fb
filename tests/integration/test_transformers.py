"""fastcurv's optimizers on Hugging Face transformers models built from configs (tiny, randomly initialised,
no download): the closure the user writes (``model(**batch).loss``) trains them, and what falls back is said."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from fastcurv.optim import EKFAC, KBFGS, KBFGSL, KFAC, SOAP, BlockHF, ExactNewton, NewtonCG  # noqa: E402

VOCAB, SEQ, BATCH = 50, 12, 8

OPTIMIZERS = {
    "kfac": lambda m: KFAC(m, lr=0.1, damping=1.0),
    "kbfgs": lambda m: KBFGS(m, lr=0.05, damping=1.0),
    "kbfgsl": lambda m: KBFGSL(m, lr=0.05, damping=1.0),
    "soap": lambda m: SOAP(m, lr=3e-3),
    "ekfac": lambda m: EKFAC(m, lr=0.1, damping=3.0),
    # the complex-step default has no rule for embeddings yet: the GGN and double-backward products run any model
    "newton_cg_ggn": lambda m: NewtonCG(m, method="ggn", damping=1.0, max_cg_iters=5),
    "newton_cg_db": lambda m: NewtonCG(m, method="double-backward", damping=1.0, max_cg_iters=5),
    "block_hf": lambda m: BlockHF(m, damping=1.0, max_cg_iters=5),
}


def _gpt2() -> torch.nn.Module:
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).train()


def _bert() -> torch.nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=SEQ, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg).train()


def _batch(kind: str):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    if kind == "gpt2":
        return {"input_ids": ids, "labels": ids}
    return {"input_ids": ids, "labels": torch.randint(0, 3, (BATCH,), generator=g)}


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_trains_a_transformers_model_with_the_users_closure(kind, name):
    model = _gpt2() if kind == "gpt2" else _bert()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a fallback warning is expected here (checked below via describe)
        opt = OPTIMIZERS[name](model)
    batch = _batch(kind)
    if name in ("newton_cg_ggn", "block_hf"):  # the GGN takes the loss's Hessian in the logits: loss outside the model
        ids, labels = batch["input_ids"], batch["labels"]

        def closure():
            logits = model(input_ids=ids).logits
            if kind == "gpt2":  # next-token prediction, as GPT2LMHeadModel's own loss
                return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
            return F.cross_entropy(logits, labels)
    else:

        def closure():
            return model(**batch).loss

    losses = [float(opt.step(closure)) for _ in range(8)]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses  # the same batch: it must go down
    assert opt.skipped_steps == 0
    text = opt.describe()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(n in text for n in names)  # every parameter is listed with how it is updated


def test_exact_newton_refuses_a_transformer_with_a_clear_error():
    """ExactNewton's Hessian recursion needs an MLP: a transformer is refused at construction, naming why."""
    with pytest.raises(ValueError, match="MLP"):
        ExactNewton(_gpt2())
