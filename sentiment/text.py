"""Text: spaCy pretokenization, a ``tokenizers`` WordLevel vocabulary built from train, and encoding.

Every step runs through ``datasets.map(batched=True)`` with a fingerprint made of what determines its output
(the input's fingerprint and the settings), so a second run with the same settings reads the cache and does no
tokenization at all.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

if TYPE_CHECKING:  # datasets is imported where it is used: prediction from a checkpoint needs none of it
    from datasets import Dataset, DatasetDict

UNK_TOKEN = "<unk>"
PAD_TOKEN = "<pad>"
SPECIAL_TOKENS = [UNK_TOKEN, PAD_TOKEN]
UNK_ID = 0
PAD_ID = 1
_HTML_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)
# Bump when the pretokenization itself changes, so old caches are not reused.
_PRETOKENIZER_VERSION = "spacy-blank-en-v2-joined"


@functools.lru_cache(maxsize=1)
def _spacy_tokenizer():
    import spacy

    return spacy.blank("en").tokenizer


def clean_text(text: str) -> str:
    """Remove IMDB's HTML line breaks (``<br />``), which spaCy would otherwise turn into tokens like ``/><br``."""
    while True:  # "<br<br>>" hides a second break: repeat until none is left (each pass shortens the text)
        text, removed = _HTML_BREAK.subn(" ", text)
        if not removed:
            return text


def _joined_words(doc) -> str:
    """The words of a spaCy ``Doc`` joined by single spaces: whitespace tokens dropped, and any whitespace inside a
    token split out, so splitting the result on whitespace gives back exactly the words."""
    return " ".join(" ".join(token.text for token in doc if not token.is_space).split())


def pretokenize_joined(texts: Sequence[str]) -> list[str]:
    """Each raw review's spaCy words (English tokenizer, no model download) as one space-separated string."""
    tokenizer = _spacy_tokenizer()
    return [_joined_words(doc) for doc in tokenizer.pipe((clean_text(t) for t in texts), batch_size=256)]


def pretokenize(texts: Sequence[str]) -> list[list[str]]:
    """Split raw reviews into words with spaCy's English tokenizer (no model download); words hold no whitespace."""
    return [joined.split() for joined in pretokenize_joined(texts)]


def _pretokenize_batch(batch: dict[str, list]) -> dict[str, list]:
    return {"words": pretokenize_joined(batch["text"])}


def _fingerprint(*parts: object) -> str:
    from datasets.fingerprint import Hasher

    return Hasher.hash(parts)


def pretokenize_splits(splits: DatasetDict, num_proc: int | None = None) -> DatasetDict:
    """Add a ``words`` column (spaCy words joined by spaces: a string column reads and writes far faster than a
    list of strings) to every split, replacing ``text``; cached on the datasets cache."""
    import spacy
    from datasets import DatasetDict

    return DatasetDict(
        {
            name: ds.map(
                _pretokenize_batch,
                batched=True,
                batch_size=500,
                num_proc=num_proc if num_proc and num_proc > 1 and len(ds) >= 1000 else None,
                remove_columns=["text"],
                new_fingerprint=_fingerprint(ds._fingerprint, _PRETOKENIZER_VERSION, spacy.__version__),
                desc=f"spaCy tokenizing {name}",
            )
            for name, ds in splits.items()
        }
    )


def build_tokenizer(
    token_lists: Iterator[list[str]] | Sequence[list[str]],
    max_vocab_size: int = 20000,
    min_freq: int = 1,
    lowercase: bool = False,
    max_length: int | None = None,
) -> Tokenizer:
    """Train a WordLevel tokenizer: the ``max_vocab_size`` most frequent words seen at least ``min_freq`` times,
    plus ``<unk>`` (id 0) and ``<pad>`` (id 1). Lowercasing and truncation live in the tokenizer itself, so
    ``tokenizer.json`` carries the preprocessing with it.
    """

    def joined() -> Iterator[list[str]]:
        batch: list[str] = []
        for tokens in token_lists:
            batch.append(" ".join(tokens))
            if len(batch) == 1000:
                yield batch
                batch = []
        if batch:
            yield batch

    return _train_word_level(joined(), max_vocab_size, min_freq, lowercase, max_length)


def _train_word_level(
    text_batches: Iterator[list[str]], max_vocab_size: int, min_freq: int, lowercase: bool, max_length: int | None
) -> Tokenizer:
    """``build_tokenizer`` on batches of space-separated words."""
    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK_TOKEN))
    if lowercase:
        tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(
        vocab_size=max_vocab_size + len(SPECIAL_TOKENS),
        min_frequency=min_freq,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    tokenizer.train_from_iterator(text_batches, trainer=trainer)
    # The trainer registers <unk> and <pad> as "added tokens", which the Rust tokenizer then cuts out of any word
    # that contains them ("a.<pad>.b" -> 3 ids, a padding id inside a review). Rebuild it from the trained vocabulary
    # alone: the same ids, one id per word.
    trained = tokenizer
    tokenizer = Tokenizer(models.WordLevel(trained.get_vocab(), unk_token=UNK_TOKEN))
    tokenizer.normalizer = trained.normalizer
    tokenizer.pre_tokenizer = trained.pre_tokenizer
    if tokenizer.token_to_id(UNK_TOKEN) != UNK_ID or tokenizer.token_to_id(PAD_TOKEN) != PAD_ID:
        raise RuntimeError("special tokens did not get ids 0 (<unk>) and 1 (<pad>)")
    if max_length is not None:
        tokenizer.enable_truncation(max_length)
    return tokenizer


def build_vocabulary(
    train_split: Dataset,
    max_vocab_size: int = 20000,
    min_freq: int = 1,
    lowercase: bool = False,
    max_length: int | None = None,
) -> Tokenizer:
    """``build_tokenizer`` over the ``words`` column of a pretokenized training split (never validation/test).

    When the split lives in the datasets cache, the trained ``tokenizer.json`` is cached beside it, keyed by the
    split's fingerprint and these settings, so a second run reads it instead of counting again.
    """
    import tokenizers

    cached = None
    if train_split.cache_files:
        key = _fingerprint(
            train_split._fingerprint, max_vocab_size, min_freq, lowercase, max_length, tokenizers.__version__
        )
        cached = Path(train_split.cache_files[0]["filename"]).parent / f"vocabulary-{key}.json"
        if cached.is_file():
            return Tokenizer.from_file(str(cached))
    column = train_split.with_format("arrow")
    batches = (column[start : start + 2000]["words"].to_pylist() for start in range(0, len(train_split), 2000))
    tokenizer = _train_word_level(batches, max_vocab_size, min_freq, lowercase, max_length)
    if cached is not None:
        tmp = cached.with_name(f".{cached.name}.tmp-{os.getpid()}")
        tokenizer.save(str(tmp))
        os.replace(tmp, cached)
    return tokenizer


def encode_tokens(tokenizer: Tokenizer, token_lists: Sequence[list[str]]) -> list[list[int]]:
    """Map pretokenized texts to ids with the Rust tokenizer; an empty text becomes a single ``<unk>``."""
    encodings = tokenizer.encode_batch(list(token_lists), is_pretokenized=True, add_special_tokens=False)
    return [encoding.ids or [UNK_ID] for encoding in encodings]


def encode_joined(tokenizer: Tokenizer, joined_words: Sequence[str]) -> list[list[int]]:
    """``encode_tokens`` for texts given as ``pretokenize_joined`` strings (whitespace-free words joined by spaces),
    through the tokenizer's fast batch path (no offsets or token strings built)."""
    encodings = tokenizer.encode_batch_fast(list(joined_words), add_special_tokens=False)
    return [encoding.ids or [UNK_ID] for encoding in encodings]


def encode_splits(splits: DatasetDict, tokenizer: Tokenizer) -> DatasetDict:
    """Replace ``words`` with ``input_ids`` (int32) and ``length``; cached, keyed by data and tokenizer. The words
    are whitespace-free (see ``pretokenize``), so encoding the joined string gives the ids ``encode_tokens`` gives
    the word list (tested), through the tokenizer's fast batch path (no offsets or strings built)."""
    from datasets import DatasetDict, Value
    from datasets import Sequence as SequenceFeature

    tokenizer_key = tokenizer.to_str()

    def encode_batch(batch: dict[str, list]) -> dict[str, list]:
        ids = encode_joined(tokenizer, batch["words"])
        return {"input_ids": ids, "length": [len(x) for x in ids]}

    encoded = {}
    for name, ds in splits.items():
        features = ds.features.copy()
        del features["words"]
        features["input_ids"] = SequenceFeature(Value("int32"))
        features["length"] = Value("int32")
        encoded[name] = ds.map(
            encode_batch,
            batched=True,
            batch_size=2000,
            remove_columns=["words"],
            features=features,
            new_fingerprint=_fingerprint(ds._fingerprint, "encode", tokenizer_key),
            desc=f"encoding {name}",
        )
    return DatasetDict(encoded)
