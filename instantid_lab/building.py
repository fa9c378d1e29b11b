"""Building small models in code: what the tiny test stack and the miniature share.

- `seeded`: seeded random initialisation that leaves torch's global generator as it was;
- `word_vocab` / `word_tokenizer`: a byte-level BPE vocabulary (CLIP's format) in which each word
  of a given list is one whole token, so a `CLIPTokenizer` can be built offline, with no file.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's global generator inside the block and restore its state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def byte_alphabet() -> list[str]:
    """The 256 printable characters byte-level BPE uses for the bytes 0..255 (GPT-2 / CLIP mapping):
    printable Latin-1 bytes stand for themselves, the others are shifted to code points 256+."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in keep]
    table = dict(zip(keep, keep)) | {b: 256 + n for n, b in enumerate(shifted)}
    return [chr(table[b]) for b in range(256)]


def word_vocab(words: Sequence[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary and merge list: every byte with and without the end-of-word
    marker `</w>`, one merge chain per word in `words`, then `<|startoftext|>` and `<|endoftext|>`.

    :return: (vocab token -> id, merges as (left, right) pairs in priority order).
    """
    alphabet = byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    for word in words:
        symbols = [*word[:-1], word[-1] + "</w>"]
        merged = symbols[0]
        for symbol in symbols[1:]:
            if (merged, symbol) not in merges:
                merges.append((merged, symbol))
            merged += symbol
            tokens.append(merged)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def word_tokenizer(words: Sequence[str], max_length: int = 77):
    """A `CLIPTokenizer` that keeps each of `words` whole (lower-cases, pads with `<|endoftext|>`)."""
    from transformers import CLIPTokenizer

    vocab, merges = word_vocab(words)
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=max_length)
