"""WikiText-2 windows for calibration and evaluation, and perplexity the SparseGPT / Wanda way.

The text ships in mrp_pass/wikitext2/ (see its README for attribution and licence):
calibration windows come from the validation split, evaluation windows from the test split.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from export.wrap import main_output

WIKITEXT_DIR = Path(__file__).parent / "wikitext2"


def _lines(name: str) -> list[str]:
    return (WIKITEXT_DIR / name).read_text(encoding="utf-8").splitlines()


def test_text() -> str:
    """The WikiText-2 raw test split, rows joined with blank lines (the usual protocol)."""
    return "\n\n".join(_lines("wiki.test.raw"))


def validation_text() -> str:
    return " ".join(_lines("wiki.valid.tokens"))


def _encode(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def calibration_windows(tokenizer, nsamples: int = 128, seqlen: int = 512, seed: int = 0) -> list[torch.Tensor]:
    """`nsamples` random `[1, seqlen]` windows of the validation text, reproducible for a seed."""
    if nsamples <= 0 or seqlen <= 0:
        raise ValueError(f"nsamples and seqlen must be positive, got nsamples={nsamples}, seqlen={seqlen}")
    ids = _encode(tokenizer, validation_text())
    if ids.numel() <= seqlen:
        raise ValueError(f"seqlen={seqlen} is longer than the validation text ({ids.numel()} tokens)")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=gen)
    return [ids[s : s + seqlen].unsqueeze(0) for s in starts.tolist()]


def evaluation_windows(tokenizer, seqlen: int = 512, max_windows: int | None = None) -> list[torch.Tensor]:
    """Non-overlapping `[1, seqlen]` windows of the test split, in order; the tail shorter than seqlen is dropped."""
    ids = _encode(tokenizer, test_text())
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    return [ids[i * seqlen : (i + 1) * seqlen].unsqueeze(0) for i in range(n)]


@torch.no_grad()
def perplexity(model, windows: list[torch.Tensor], device: str | torch.device | None = None,
               progress: bool = False) -> float:
    """exp(mean next-token NLL) over the windows, each scored on its own (no context carried over),
    as SparseGPT's and Wanda's eval code does: nll_i = loss_i * seqlen, ppl = exp(sum nll / (n * seqlen))."""
    if not windows:
        raise ValueError("perplexity needs at least one evaluation window")
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    it = windows
    if progress:
        from tqdm import tqdm

        it = tqdm(windows, desc="perplexity", leave=False)
    try:
        for w in it:
            w = w.to(device)
            logits = main_output(model(w))[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))
            total += loss.item() * w.shape[1]
            count += w.shape[1]
    finally:
        model.train(was_training)
    return math.exp(total / count)
