"""Tokenizers: a WordPiece vocabulary trained on the corpus for scratch models (Chinese characters split
one per token, as in bert-base-chinese), saved as a normal `vocab.txt` and loaded as a fast BERT tokenizer.

The same corpus and settings give the same vocabulary, byte for byte, on any machine and in any process.
`tokenizers`' WordPiece trainer alone does not: it numbers the continuation pieces (`##x`) in the order of a
hash map that Rust seeds anew in every process, and breaks ties between equally frequent merges by those
numbers, so two runs pick different merges (5,733 entries in one, 5,734 in the next, and every exam id moves
with them). Here a first pass finds which `##x` pieces the corpus has (a set: the same in every run), and the
real pass is given them up front, in sorted order, so every number and every tie-break is fixed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from transformers import BertTokenizerFast

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Part of the vocabulary cache's key: bumped when the trainer's output for the same input changes.
VOCAB_TRAINER_VERSION = "deterministic-1"


def _wordpiece(vocab_size: int, pinned: list[str]):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    # Same normalisation and pre-tokenisation as BertTokenizerFast, so the saved vocab.txt behaves the
    # same when loaded back (CJK characters become single-character words before WordPiece sees them).
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS + pinned,
                                        show_progress=False)
    return tok, trainer


def train_wordpiece(texts: Iterable[str], vocab_size: int, out_dir: Path) -> None:
    texts = texts if isinstance(texts, list) else list(texts)  # read twice (two passes)
    tok, trainer = _wordpiece(vocab_size, [])
    tok.train_from_iterator(texts, trainer)
    pieces = sorted(t for t in tok.get_vocab() if t.startswith("##") and len(t) == 3)
    tok, trainer = _wordpiece(vocab_size, pieces)
    tok.train_from_iterator(texts, trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.model.save(str(out_dir))  # writes vocab.txt, in id order
    # Loaded from vocab.txt alone: the pinned pieces are ordinary entries again, not added tokens.
    BertTokenizerFast.from_pretrained(str(out_dir)).save_pretrained(str(out_dir))


def load_tokenizer(path: str | Path) -> BertTokenizerFast:
    return BertTokenizerFast.from_pretrained(str(path), local_files_only=True)
