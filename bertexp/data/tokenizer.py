"""Tokenizers: a WordPiece vocabulary trained on the corpus for scratch models (Chinese characters split
one per token, as in bert-base-chinese), saved as a normal `vocab.txt` and loaded as a fast BERT tokenizer."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from transformers import BertTokenizerFast

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(texts: Iterable[str], vocab_size: int, out_dir: Path) -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    # Same normalisation and pre-tokenisation as BertTokenizerFast, so the saved vocab.txt behaves the
    # same when loaded back (CJK characters become single-character words before WordPiece sees them).
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.model.save(str(out_dir))  # writes vocab.txt
    BertTokenizerFast.from_pretrained(str(out_dir)).save_pretrained(str(out_dir))


def load_tokenizer(path: str | Path) -> BertTokenizerFast:
    return BertTokenizerFast.from_pretrained(str(path), local_files_only=True)
