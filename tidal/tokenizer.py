"""Tokenizer loading: transformers' AutoTokenizer from the model directory, offline."""

from __future__ import annotations

import os

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(model_dir: str):
    """The HF tokenizer saved in ``model_dir`` (local files only, never the network)."""
    from transformers import AutoTokenizer

    if not os.path.isdir(model_dir):
        raise ValueError(f"model directory {model_dir!r} does not exist or is not a directory")
    if not any(os.path.isfile(os.path.join(model_dir, f)) for f in TOKENIZER_FILES):
        raise ValueError(
            f"model directory {model_dir!r} has no tokenizer: expected one of "
            f"{list(TOKENIZER_FILES)}, found {sorted(os.listdir(model_dir))}"
        )
    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"could not load the tokenizer in {model_dir!r}: {e}") from e
