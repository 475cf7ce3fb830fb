"""The language-model problem: a small decoder-only transformer trained as a character-level language model on
text that every machine already has.

Corpus
------
Twenty modules of Python's own standard library (:data:`CORPUS`), each pinned by its SHA-256: the listed files
are byte-identical in CPython 3.10, 3.11, 3.12 and 3.13 (checked on the pyenv builds and on Debian's 3.11), so
the data are the same everywhere without a download. About 270 KB of English prose (docstrings, comments)
and code. A file that is missing or whose checksum differs (a future Python, a distribution that patches or
strips the standard library) is left out with a warning naming it; fewer than half of the bytes verified is
an error. :attr:`LMProblem.description` lists what was used.

Split: the first 90% of every file (in characters) is training text, the last 10% test text, so both splits
see every file's style and no test character is ever trained on.

Tokens: characters. The vocabulary is fixed (not read from the data): the 95 printable ASCII characters plus
newline (tabs become 4 spaces; any other character becomes ``?``), 96 symbols.

Model (:meth:`LMProblem.build_model`)
-------------------------------------
GPT-2's block structure, built from torch modules only: token ``nn.Embedding`` plus a learned position
embedding; ``n_layer`` pre-LayerNorm blocks of causal self-attention (separate ``nn.Linear`` projections
``q``, ``k``, ``v``, ``proj``; ``F.scaled_dot_product_attention(is_causal=True)``) and an MLP
(``nn.Linear(d, 4d)``, GELU, ``nn.Linear(4d, d)``); a final LayerNorm; the output head tied to the token
embedding (logits = ``h Eᵀ``). Initialisation follows GPT-2 (normal, std 0.02; residual projections scaled
by ``1/sqrt(2 n_layer)``), drawn from a private generator so a seed gives the same model everywhere.

Loss: mean cross-entropy over every predicted position (nats per character).

Sizes (``size=``): ``"small"`` (the CPU default: 2 layers, width 128, 4 heads, context 64), ``"medium"``
(4 layers, width 256, context 128) and ``"large"`` (6 layers, width 384, 6 heads, context 256) for a GPU.
"""

from __future__ import annotations

import hashlib
import math
import sysconfig
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastcurv.data import ProblemError

__all__ = ["CORPUS", "SIZES", "VOCAB", "LMProblem", "TinyGPT", "load_lm", "encode", "decode"]

#: (path relative to the standard library, SHA-256 of its bytes)
CORPUS: tuple[tuple[str, str], ...] = (
    ("difflib.py", "0c6afc23568d55b3e9ac914f9c5361e3033e778aa5b58d3cc82835fc5c638679"),
    ("optparse.py", "07d224301cba312fa0697bff9cd5a4bb4f778a90629632091b3f4ae874d89af5"),
    ("tracemalloc.py", "c2cc84a05b824df79840c98729a0e94ef8909b11c528a1b2c5a00aa436b97b25"),
    ("xml/sax/handler.py", "64c7aae49f1dd382a7b9012610307bfa1d43a14a5dc09a5c8da30903f6805c3d"),
    ("_markupbase.py", "cb14dd6f2e2439eb70b806cd49d19911363d424c2b6b9f4b73c9c08022d47030"),
    ("json/__init__.py", "d5d41e2c29049515d295d81a6d40b4890fbec8d8482cfb401630f8ef2f77e4d5"),
    ("unittest/suite.py", "ed2da92bc9f97c53403ee2d3d12cc53b16a96e85d596ebc887b5a93458f3f6bc"),
    ("xml/sax/saxutils.py", "3fe2cdb6386e0c4d42d37c657bbecb78b69c57aedb1610dbd8bf4043944130ab"),
    ("xml/dom/xmlbuilder.py", "d4f33a8f018755626b64557953a91c6bba21ff613da46f7558a2874aa5d08ebf"),
    ("pyclbr.py", "e8ca09333701ba41244e20b8c2c37b7ed0499b88c4b2ca82cac51ef89ca9e647"),
    ("multiprocessing/heap.py", "f6bb79bb99b9ae484935f0d68822e9603a1622dd0b6c4966c79db232a93ba614"),
    ("urllib/robotparser.py", "389b811835f9a3ba72b192c3487b0266fa31f6e571b7a83ceb2a34792dc0d9fc"),
    ("multiprocessing/reduction.py", "4999f8b9ae7b3e8a7f5de302612b4131498dc2e238a2c47f894905c1c63294fe"),
    ("email/_encoded_words.py", "4178321600c0a19ca04cfe8542ce44487f339d15d89a473b58cea63c0b230217"),
    ("_threading_local.py", "e1bf3dae66d0bfa63c8bb8a1d10c611203c35c636f7f5191fd56105788ef29cb"),
    ("asyncio/protocols.py", "1d1b49988c338b4ef06e30f9e92d9db2e00080c341f0a3f573bb8312deb8aff6"),
    ("wsgiref/headers.py", "0fbf95a47d8e4c0d831fd52312ec43076cbf503c190269876f170a5cf5585fb9"),
    ("_py_abc.py", "f9c6fe3dd9b51bd7d93f867356e9d362600c924febfd903ee1c6e298860dca92"),
    ("_compression.py", "3ad5d60627477a60939ee44fc1bb3a05dbe8fb52f0f75039b8f5d8f1a278b981"),
    ("unittest/util.py", "fdcc640c3505d16deab9c32eae7c3f5f67c3b5e81c563dc6698fa7fcf403854d"),
)

VOCAB: str = "\n" + "".join(chr(c) for c in range(32, 127))
_INDEX = {ch: i for i, ch in enumerate(VOCAB)}
_UNKNOWN = _INDEX["?"]

#: size name -> (n_layer, d_model, n_head, block_size, batch_size)
SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "small": (2, 128, 4, 64, 32),
    "medium": (4, 256, 4, 128, 32),
    "large": (6, 384, 6, 256, 64),
}


def encode(text: str) -> Tensor:
    """Characters -> int64 token ids in :data:`VOCAB` (tabs become 4 spaces, unknown characters ``?``)."""
    text = text.replace("\t", "    ")
    return torch.tensor([_INDEX.get(ch, _UNKNOWN) for ch in text], dtype=torch.int64)


def decode(tokens: Tensor) -> str:
    """Token ids -> text (the inverse of :func:`encode` on its image)."""
    return "".join(VOCAB[int(t)] for t in tokens.reshape(-1))


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _read_corpus(root: Path | None = None) -> tuple[list[str], list[str]]:
    """The verified texts and the names of the files left out (missing or different)."""
    root = _stdlib_dir() if root is None else root
    texts, missing = [], []
    for rel, digest in CORPUS:
        try:
            raw = (root / rel).read_bytes()
        except OSError:
            missing.append(rel)
            continue
        if hashlib.sha256(raw).hexdigest() != digest:
            missing.append(rel)
            continue
        texts.append(raw.decode("utf-8"))
    return texts, missing


class _Block(nn.Module):
    def __init__(self, d: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln1 = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.ln1(x)
        heads = lambda z: z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2)  # noqa: E731
        a = F.scaled_dot_product_attention(heads(self.q(h)), heads(self.k(h)), heads(self.v(h)), is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """A GPT-2-style decoder (see the module docstring); ``forward(idx)`` maps (B, T) token ids to (B, T, V)
    logits."""

    def __init__(self, vocab_size: int, n_layer: int, d_model: int, n_head: int, block_size: int) -> None:
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"TinyGPT: d_model ({d_model}) must be divisible by n_head ({n_head})")
        self.block_size = block_size
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(block_size, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[-1]
        if t > self.block_size:
            raise ValueError(f"TinyGPT: sequence length {t} exceeds the context {self.block_size}")
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return F.linear(self.ln_f(x), self.tok.weight)  # the head is tied to the token embedding


@dataclass(frozen=True, eq=False)
class LMProblem:
    """The character-level language-model problem (see the module docstring).

    Attributes:
        name: ``"lm"``.
        size: the size name (:data:`SIZES`).
        train_tokens, test_tokens: 1-D int64 CPU tensors of token ids.
        n_layer, d_model, n_head, block_size: the model's shape; ``batch_size`` the default batch (sequences).
        description: one paragraph: corpus files used, token counts, model, loss.
    """

    name: str
    size: str
    train_tokens: Tensor = field(repr=False)
    test_tokens: Tensor = field(repr=False)
    n_layer: int
    d_model: int
    n_head: int
    block_size: int
    batch_size: int
    description: str

    #: the loss kind (for the comparison's K-FAC likelihood): cross-entropy over tokens
    loss: str = "ce"

    @property
    def vocab_size(self) -> int:
        return len(VOCAB)

    @property
    def train_x(self) -> Tensor:
        """Training windows for the comparison's minibatch stream: ``(N, block_size + 1)`` token ids, the text cut
        at every ``block_size`` tokens (each window overlaps the next by the one token it predicts)."""
        return _windows(self.train_tokens, self.block_size)

    @property
    def test_x(self) -> Tensor:
        """Test windows, cut like :attr:`train_x`."""
        return _windows(self.test_tokens, self.block_size)

    @property
    def layer_sizes(self) -> list[int]:
        """Widths along the network (vocabulary, ``d_model`` per block, vocabulary), for the comparison's JSON."""
        return [self.vocab_size, *([self.d_model] * self.n_layer), self.vocab_size]

    @staticmethod
    def split(windows: Tensor) -> tuple[Tensor, Tensor]:
        """Inputs and next-token targets of a batch of windows: ``(w[:, :-1], w[:, 1:])``."""
        return windows[:, :-1], windows[:, 1:]

    def build_model(self, seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyGPT:
        """A freshly initialised :class:`TinyGPT` (GPT-2 initialisation from a private generator seeded with
        ``seed``; drawn in float32, then cast to ``dtype``)."""
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"build_model: seed must be an int, got {type(seed).__name__}")
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"build_model: dtype must be a floating torch.dtype, got {dtype!r}")
        model = TinyGPT(self.vocab_size, self.n_layer, self.d_model, self.n_head, self.block_size)
        gen = torch.Generator().manual_seed(seed)
        resid = 0.02 / math.sqrt(2 * self.n_layer)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                elif ".ln" in name or name.startswith("ln_"):
                    p.fill_(1.0)
                else:
                    std = resid if name.endswith(("proj.weight", "out.weight")) else 0.02
                    p.copy_(torch.empty(p.shape).normal_(0.0, std, generator=gen))
        return model.to(dtype)

    def loss_fn(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy (nats per character) of (B, T, V) logits against (B, T) next-token ids."""
        if logits.dim() != 3 or targets.shape != logits.shape[:2]:
            raise ValueError(
                f"loss_fn: logits must be (B, T, V) and targets (B, T); got {tuple(logits.shape)} and "
                f"{tuple(targets.shape)}"
            )
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def batch(
        self, split: str = "train", batch_size: int | None = None, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """``batch_size`` random windows of ``block_size`` tokens and their next-token targets (x, y)."""
        if split not in ("train", "test"):
            raise ValueError(f"batch: split must be 'train' or 'test', got {split!r}")
        b = self.batch_size if batch_size is None else batch_size
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"batch: batch_size must be a positive int, got {b!r}")
        data = self.train_tokens if split == "train" else self.test_tokens
        start = torch.randint(0, data.numel() - self.block_size - 1, (b,), generator=generator)
        idx = start[:, None] + torch.arange(self.block_size + 1)
        w = data[idx]
        return w[:, :-1], w[:, 1:]


def _windows(tokens: Tensor, block: int) -> Tensor:
    n = (tokens.numel() - 1) // block
    return tokens[: n * block + 1].unfold(0, block + 1, block)


def load_lm(size: str = "small", *, root: Path | str | None = None) -> LMProblem:
    """Set up the language-model problem of the given size (see the module docstring).

    Args:
        size: ``"small"``, ``"medium"`` or ``"large"`` (:data:`SIZES`).
        root: the standard-library directory to read the corpus from (default: this interpreter's).

    Raises:
        ProblemError: unknown size, or fewer than half of the corpus' bytes present and verified.
    """
    if size not in SIZES:
        raise ProblemError(f"lm: unknown size {size!r}; known sizes: {', '.join(SIZES)}")
    texts, missing = _read_corpus(None if root is None else Path(root))
    n_ok = sum(len(t) for t in texts)
    if not texts or n_ok < 135_000:
        raise ProblemError(
            f"lm: only {n_ok} characters of the corpus verified (missing or changed: {', '.join(missing)}); the "
            f"problem needs Python's standard library as shipped by CPython 3.10-3.13"
        )
    if missing:
        warnings.warn(f"lm: corpus files missing or changed, left out: {', '.join(missing)}", stacklevel=2)
    train, test = [], []
    for t in texts:
        cut = int(0.9 * len(t))
        train.append(t[:cut])
        test.append(t[cut:])
    train_tokens, test_tokens = encode("".join(train)), encode("".join(test))
    n_layer, d, h, block, bs = SIZES[size]
    used = len(CORPUS) - len(missing)
    desc = (
        f"lm ({size}): character-level language model on {used} standard-library modules pinned by SHA-256 "
        f"({train_tokens.numel():,} train / {test_tokens.numel():,} test characters, vocabulary {len(VOCAB)}); "
        f"GPT-2-style decoder, {n_layer} layers, width {d}, {h} heads, context {block}, tied head; mean "
        f"cross-entropy per character"
    )
    return LMProblem("lm", size, train_tokens, test_tokens, n_layer, d, h, block, bs, desc)
