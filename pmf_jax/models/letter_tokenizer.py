"""A tiny CLIP tokenizer for tiny random models (the tests, ``bench --tiny``): a BPE vocabulary of lower-case
letters, written as vocab.json + merges.txt.

Token ids: letters 0-25, letters ending a word ("a</w>") 26-51, then the merged word (if any, e.g. "an</w>" = 52),
"<|startoftext|>" and "<|endoftext|>". No download: transformers' CLIPTokenizer reads the folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def write_letter_vocab(folder: Path, merge: Optional[str] = "an") -> Dict[str, int]:
    """Writes ``folder/vocab.json`` and ``folder/merges.txt`` (folder created) and returns the vocabulary.

    Args:
      merge: a two-letter word with its own token (BPE merges its letters), or None for letters only.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {c: i for i, c in enumerate(LETTERS)}
    vocab.update({c + "</w>": len(LETTERS) + i for i, c in enumerate(LETTERS)})
    if merge:
        vocab[merge + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + (f"{merge[0]} {merge[1:]}</w>\n" if merge else ""))
    return vocab


def letter_tokenizer(folder: Path, merge: Optional[str] = "an", model_max_length: int = 16):
    """A transformers ``CLIPTokenizer`` over :func:`write_letter_vocab`'s files in ``folder``."""
    from transformers import CLIPTokenizer

    write_letter_vocab(folder, merge)
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=model_max_length)
