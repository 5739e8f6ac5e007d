"""Property-based tests (hypothesis) for sentiment.text and sentiment.batching on arbitrary input.

The WordLevel tokenizers are built once per (lowercase, max_length) and cached at module level; spaCy itself is
loaded once by sentiment.text. Hypothesis' example database is off (no failing examples are saved between runs):
the minimal counterexamples of known bugs are pinned with ``@example`` instead.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections import Counter

import numpy as np
import pyarrow as pa
import torch
from conftest import NEGATIVE, NEUTRAL, POSITIVE, make_split
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from sentiment.batching import EncodedSplit, LengthGroupedBatchSampler, PadCollator, SortedBatchSampler
from sentiment.text import (
    PAD_TOKEN,
    UNK_ID,
    UNK_TOKEN,
    build_tokenizer,
    clean_text,
    encode_joined,
    encode_tokens,
    pretokenize,
    pretokenize_joined,
)

PROPERTY = settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FEW = settings(PROPERTY, max_examples=50)

# The line break clean_text promises to remove (the same definition as sentiment.text's).
LINE_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)
# Rust's char::is_whitespace (Unicode White_Space), which the tokenizer's WhitespaceSplit splits on. Python's
# str.isspace is a superset (it also counts U+001C..U+001F), so "no str.isspace character" implies "no split".
RUST_WHITESPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"
)
RUST_SPLIT = re.compile(f"[{re.escape(RUST_WHITESPACE)}]+")


def has_space(text: str) -> bool:
    """Whether ``text`` holds any whitespace character (in Python's wider sense)."""
    return any(c.isspace() for c in text)


# ------------------------------------------------------------------------------------------ strategies

# Pieces of reviews: IMDB's breaks and their fragments, the special tokens' spellings, whitespace runs, emoji,
# right-to-left scripts, control characters (st.text includes them) and very long words.
FRAGMENTS = ["<br />", "<br/>", "<BR>", "<br>", "<Br  />", "<br", "br />", "/>", "<", ">", "<pad>", "<unk>", "a.", ".b"]
WHITESPACE = st.text(alphabet=RUST_WHITESPACE + "\x1c\x1d\x1e\x1f\u200b\u200e\u200f", min_size=1, max_size=4)
RTL = st.text(alphabet=st.characters(min_codepoint=0x0590, max_codepoint=0x06FF), min_size=1, max_size=12)
EMOJI = st.text(alphabet=st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF), min_size=1, max_size=4)
LONG_WORD = st.tuples(st.text(min_size=1, max_size=4), st.integers(50, 1500)).map(lambda p: p[0] * p[1])
EXTRA_WORDS = ["Ünïcödé", "ΑΣ", "İstanbul", "straße", "🙂", "naïve", "MOVIE", "hapax", "ΣΟΦΙΑ"]
WORDS = sorted({*POSITIVE, *NEGATIVE, *NEUTRAL, *EXTRA_WORDS, ".", "!", ","})
WORD = st.sampled_from(WORDS)
PIECE = st.one_of(st.text(), st.sampled_from(FRAGMENTS), WHITESPACE, RTL, EMOJI, LONG_WORD, WORD)
REVIEW = st.lists(PIECE, max_size=10).map("".join)
# Text made mostly of the bits of line breaks, so that breaks, partial breaks and nested ones are common.
BR_SOUP = st.lists(
    st.sampled_from(["<", "<br", "<BR", "br", " ", "/", ">", "/>", "<br>", "<br />", "x"]), min_size=3
).map("".join)
# Words glued to punctuation and to the special tokens' spellings, which spaCy may keep as one word.
GLUED = st.lists(
    st.one_of(WORD, st.sampled_from(["<pad>", "<unk>", ".", ":", "/", "-", "0", "a", " "])), min_size=1
).map("".join)

# Line breaks in every spelling the regex accepts, and text that holds no "<" of its own.
BREAK = st.builds(
    "<{}{}{}>".format,
    st.sampled_from(["br", "BR", "Br", "bR"]),
    st.text(alphabet=" \t\n\r\xa0\u3000", max_size=3),
    st.sampled_from(["", "/"]),
)
NO_ANGLE = st.one_of(
    st.text(alphabet=st.characters(blacklist_characters="<", blacklist_categories=["Cs"])),
    WHITESPACE,
    RTL,
    EMOJI,
    WORD,
)

# Pretokenized words: corpus words (some frequent, some rare, in other cases), anything, several joined by space.
TOKEN = st.one_of(
    WORD,
    WORD.map(str.upper),
    WORD.map(str.title),
    st.text(),
    st.lists(WORD, min_size=2, max_size=3).map(" ".join),
    st.sampled_from(FRAGMENTS),
)
TOKEN_LISTS = st.lists(st.lists(TOKEN, max_size=12), min_size=1, max_size=6)
MAX_LENGTH = st.sampled_from([None, 1, 3, 10])


@functools.lru_cache(maxsize=1)
def corpus() -> tuple[tuple[str, ...], ...]:
    """Fixture reviews pretokenized by spaCy, plus non-ASCII words; "hapax" and "ΣΟΦΙΑ" are seen only once."""
    extra = [EXTRA_WORDS[:7] * 2, ["hapax", "ΣΟΦΙΑ"]]
    return tuple(tuple(tokens) for tokens in [*pretokenize(make_split(30, 5)[0]), *extra])


@functools.cache
def corpus_tokenizer(lowercase: bool, max_length: int | None) -> Tokenizer:
    """The WordLevel tokenizer of ``corpus()`` with min_freq 2 (so rare corpus words are unknown)."""
    return build_tokenizer([list(t) for t in corpus()], min_freq=2, lowercase=lowercase, max_length=max_length)


def normalize(tokenizer: Tokenizer, text: str) -> str:
    """``text`` as the tokenizer's normalizer (lowercasing, if any) sees it."""
    return tokenizer.normalizer.normalize_str(text) if tokenizer.normalizer is not None else text


def expected_ids(tokenizer: Tokenizer, tokens: list[str], max_length: int | None) -> list[int]:
    """The ids a WordLevel lookup should give: each word normalized and split on whitespace, each piece its
    vocabulary id or ``<unk>``; truncated to max_length; an empty result is a single ``<unk>``."""
    vocab = tokenizer.get_vocab()
    pieces = [piece for token in tokens for piece in RUST_SPLIT.split(normalize(tokenizer, token)) if piece]
    return [vocab.get(piece, UNK_ID) for piece in pieces][:max_length] or [UNK_ID]


def no_special(token: str) -> bool:
    """Whether ``token`` holds no special token's spelling (see test_encode_pretokenized_text_one_id_per_word)."""
    return UNK_TOKEN not in token and PAD_TOKEN not in token


# ---------------------------------------------------------------------------------------------- text


@PROPERTY
@example(["", " ", "\n\t ", "<br />" * 3, "a" * 5000])
@given(st.lists(REVIEW, max_size=6))
def test_pretokenize_arbitrary_text(texts: list[str]) -> None:
    """Any text: one token list per text, no empty or whitespace token, and the tokens are the cleaned text
    without its whitespace (spaCy's tokenization is non-destructive)."""
    token_lists = pretokenize(texts)
    assert len(token_lists) == len(texts)
    for text, tokens in zip(texts, token_lists, strict=True):
        for token in tokens:
            assert token
            assert not has_space(token), token
        assert "".join(tokens) == "".join(clean_text(text).split())


@PROPERTY
@given(st.lists(st.tuples(NO_ANGLE, BREAK)), NO_ANGLE)
def test_pretokenize_drops_every_line_break(parts: list[tuple[str, str]], last: str) -> None:
    """Text whose only "<" are line breaks (any spelling, several in a row): no token holds "<br" (nor "<"),
    and the tokens are those of the text with each break replaced by a space."""
    text = "".join(piece + br for piece, br in parts) + last
    spaced = "".join(piece + " " for piece, _ in parts) + last
    [tokens] = pretokenize([text])
    assert not any("<" in token for token in tokens), tokens
    assert tokens == pretokenize([spaced])[0]


# BUG (sentiment/text.py, clean_text): one pass of re.sub can join the pieces around a removed break into a new
# break, e.g. "<br<br>>" -> "<br >", so the output still holds a line break and spaCy then makes a "<br" token
# ("fun.<br<br />/>The" -> ["fun.<br", "/>The"]). Fix: repeat the substitution until it removes nothing.
@PROPERTY
@example("<br<br>>")
@example("fun.<br<br />/>The")
@given(st.one_of(REVIEW, BR_SOUP))
def test_clean_text_leaves_no_line_break(text: str) -> None:
    """clean_text's output holds no line break, whatever the input (it is idempotent)."""
    cleaned = clean_text(text)
    assert LINE_BREAK.search(cleaned) is None, cleaned
    assert clean_text(cleaned) == cleaned


@PROPERTY
@given(TOKEN_LISTS, st.booleans(), MAX_LENGTH)
def test_encode_arbitrary_token_lists(token_lists: list[list[str]], lowercase: bool, max_length: int | None) -> None:
    """Any words: one id list per text, non-empty, ids in [0, vocab_size), at most max_length ids."""
    tokenizer = corpus_tokenizer(lowercase, max_length)
    encoded = encode_tokens(tokenizer, token_lists)
    assert len(encoded) == len(token_lists)
    for ids in encoded:
        assert len(ids) >= 1
        assert all(0 <= i < tokenizer.get_vocab_size() for i in ids)
        if max_length is not None:
            assert len(ids) <= max_length


@PROPERTY
@given(TOKEN_LISTS.map(lambda lists: [[t for t in tokens if no_special(t)] for tokens in lists]), st.booleans())
def test_encode_maps_words_to_their_ids(token_lists: list[list[str]], lowercase: bool) -> None:
    """Each whitespace-free word alone gives one id: its own (id_to_token gives the normalized word back) when the
    normalized word is in the vocabulary, else ``<unk>``; a whole text gives the ids of its whitespace-split
    pieces in order, truncated to max_length. (Spellings of special tokens inside words: see the bug test.)"""
    tokenizer = corpus_tokenizer(lowercase, None)
    vocab = tokenizer.get_vocab()
    words = [t for tokens in token_lists for t in tokens if t and not has_space(t)]
    for word, ids in zip(words, encode_tokens(tokenizer, [[w] for w in words]), strict=True):
        normalized = normalize(tokenizer, word)
        if lowercase and word.isascii():
            assert normalized == word.lower()
        assert len(ids) == 1, (word, ids)
        if normalized in vocab:
            assert tokenizer.id_to_token(ids[0]) == normalized
        else:
            assert ids == [UNK_ID], (word, ids)
    for max_length in (None, 3):
        truncating = corpus_tokenizer(lowercase, max_length)
        expected = [expected_ids(truncating, tokens, max_length) for tokens in token_lists]
        assert encode_tokens(truncating, token_lists) == expected


# BUG (sentiment/text.py, build_tokenizer/encode_tokens): "<unk>" and "<pad>" are registered as added special
# tokens, which the Rust tokenizer cuts out of every word before the vocabulary lookup, even with
# is_pretokenized=True. spaCy keeps "a.<pad>.b" as one word, and encode_tokens gives it three ids, one of them
# PAD_ID (1) in the middle of the review, where the embedding's padding_idx makes it a zero vector.
@PROPERTY
@example("0:<pad>0", False)
@example("a.<pad>.b", True)
@given(st.one_of(REVIEW, GLUED), st.booleans())
def test_encode_pretokenized_text_one_id_per_word(text: str, lowercase: bool) -> None:
    """Pretokenized text: every spaCy word becomes exactly one id, its vocabulary id or ``<unk>``."""
    tokenizer = corpus_tokenizer(lowercase, None)
    vocab = tokenizer.get_vocab()
    [words] = pretokenize([text])
    [ids] = encode_tokens(tokenizer, [words])
    assert all(0 <= i < tokenizer.get_vocab_size() for i in ids)
    assert ids == ([vocab.get(normalize(tokenizer, w), UNK_ID) for w in words] or [UNK_ID]), (words, ids)


@PROPERTY
@example("a\xa0b c\u2003d\x1fe", True, 3)
@given(st.one_of(REVIEW, GLUED), st.booleans(), MAX_LENGTH)
def test_joined_words_encode_like_word_lists(text: str, lowercase: bool, max_length: int | None) -> None:
    """The prepare path (joined words through the fast batch encoder) gives exactly the ids of the prediction path
    (word lists, is_pretokenized), for any text, with or without lowercasing and truncation."""
    tokenizer = corpus_tokenizer(lowercase, max_length)
    [joined] = pretokenize_joined([text])
    assert joined.split() == pretokenize([text])[0]
    assert encode_joined(tokenizer, [joined]) == encode_tokens(tokenizer, pretokenize([text]))


@FEW
@given(REVIEW, st.booleans(), st.sampled_from([1, 2, 5, 20]))
def test_encode_pretokenized_text_max_length(text: str, lowercase: bool, max_length: int) -> None:
    """With max_length, pretokenized text gives between 1 and max_length ids, all in the vocabulary's range."""
    tokenizer = corpus_tokenizer(lowercase, max_length)
    [ids] = encode_tokens(tokenizer, pretokenize([text]))
    assert 1 <= len(ids) <= max_length
    assert all(0 <= i < tokenizer.get_vocab_size() for i in ids)


# ------------------------------------------------------------------------------------------- samplers


def batches_of(sampler: LengthGroupedBatchSampler | SortedBatchSampler) -> list[list[int]]:
    """All batches one pass over ``sampler`` yields."""
    return [list(batch) for batch in sampler]


def flat(batches: list) -> list[int]:
    """The indices of ``batches`` in order."""
    return [int(i) for batch in batches for i in batch]


@st.composite
def sampler_args(draw: st.DrawFn) -> dict:
    """Lengths (1..500 reviews of 1..5000 tokens) and sampler settings with num_replicas <= len(lengths)."""
    lengths = draw(st.integers(1, 500).flatmap(lambda n: st.lists(st.integers(1, 5000), min_size=n, max_size=n)))
    return {
        "lengths": lengths,
        "batch_size": draw(st.integers(1, 64)),
        "seed": draw(st.integers(0, 2**32 - 1)),
        "chunk_batches": draw(st.integers(1, 60)),
        "num_replicas": draw(st.integers(1, min(4, len(lengths)))),
    }


@PROPERTY
@example({"lengths": [5] * 7, "batch_size": 1, "seed": 0, "chunk_batches": 50, "num_replicas": 3}, 0)
@example({"lengths": [1, 2, 3], "batch_size": 64, "seed": 0, "chunk_batches": 1, "num_replicas": 3}, 0)
@given(sampler_args(), st.integers(0, 1000))
def test_length_grouped_sampler(args: dict, epoch: int) -> None:
    """Every index once over all ranks (batch_size 1 with n % num_replicas != 0: n % num_replicas reviews are left
    out), equal batch counts, len() right, batches non-empty, at most batch_size, sorted longest first, the
    batches of a step neighbours in length, step_sizes their totals, and the same batches for the same
    (seed, epoch)."""
    lengths, batch_size, replicas = np.asarray(args["lengths"]), args["batch_size"], args["num_replicas"]
    n = len(lengths)
    samplers = [LengthGroupedBatchSampler(**args, rank=rank) for rank in range(replicas)]
    for sampler in samplers:
        sampler.set_epoch(epoch)
    per_rank = [batches_of(sampler) for sampler in samplers]
    global_batches = [b.tolist() for b in samplers[0].global_batches()]

    assert len({len(batches) for batches in per_rank}) == 1, [len(b) for b in per_rank]
    for rank, (sampler, batches) in enumerate(zip(samplers, per_rank, strict=True)):
        assert len(sampler) == len(batches)
        assert batches == global_batches[rank::replicas]
        for batch in batches:
            assert 1 <= len(batch) <= batch_size
            assert list(lengths[batch]) == sorted(lengths[batch], reverse=True)

    counts = Counter(i for batches in per_rank for i in flat(batches))
    assert set(counts.values()) <= {1}
    dropped = n % replicas if batch_size == 1 else 0
    assert len(counts) == n - dropped
    assert set(counts) <= set(range(n))

    # The batches of one step are neighbours in a chunk's length order (each one's shortest review at least as long
    # as the next one's longest), but for at most one step per chunk made of what chunks could not share out.
    apart = 0
    for step in range(0, len(global_batches), replicas):
        group = global_batches[step : step + replicas]
        apart += any(min(lengths[a]) < max(lengths[b]) for a, b in itertools.pairwise(group))
    assert apart <= -(-n // (batch_size * args["chunk_batches"])), apart
    single = LengthGroupedBatchSampler(args["lengths"], batch_size, args["seed"], args["chunk_batches"])
    single.set_epoch(epoch)
    assert sorted(flat(global_batches)) == sorted(flat(single.global_batches()))[: n - dropped] or dropped
    steps = samplers[rank].step_sizes()
    assert len(steps) == len(per_rank[0])
    assert steps == [sum(len(batches[step]) for batches in per_rank) for step in range(len(steps))]

    # Deterministic per (seed, epoch): a fresh sampler, and the same sampler after another epoch.
    again = LengthGroupedBatchSampler(**args, rank=replicas - 1)
    again.set_epoch(epoch)
    assert batches_of(again) == per_rank[-1]
    samplers[0].set_epoch(epoch + 1)
    samplers[0].set_epoch(epoch)
    assert batches_of(samplers[0]) == per_rank[0]


@PROPERTY
@given(
    st.integers(0, 500).flatmap(lambda n: st.lists(st.integers(1, 5000), min_size=n, max_size=n)),
    st.integers(1, 64),
    st.integers(1, 4),
)
def test_sorted_sampler(lengths: list[int], batch_size: int, replicas: int) -> None:
    """Every index exactly once over all ranks; each rank's batches, in order, go longest first; one rank gets
    the indices sorted by (length descending, index) in full batches but the last."""
    lengths_array = np.asarray(lengths, dtype=np.int64)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    expected = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    counts = Counter()
    for rank in range(replicas):
        sampler = SortedBatchSampler(lengths, batch_size, num_replicas=replicas, rank=rank)
        batches = batches_of(sampler)
        assert len(sampler) == len(batches)
        assert all(1 <= len(b) <= batch_size for b in batches)
        assert batches == expected[rank::replicas]
        indices = flat(batches)
        assert list(lengths_array[indices]) == sorted(lengths_array[indices], reverse=True)
        counts.update(indices)
    assert sorted(counts) == list(range(len(lengths)))
    assert set(counts.values()) <= {1}
    assert flat(batches_of(SortedBatchSampler(lengths, batch_size))) == order


# --------------------------------------------------------------------------------- EncodedSplit, collate


def id_table(rows: list[list[int]], labels: list[int]) -> pa.Table:
    """A table like the encoded datasets: ``input_ids`` list<int32> and ``label``."""
    return pa.table({"input_ids": pa.array(rows, pa.list_(pa.int32())), "label": pa.array(labels, pa.int64())})


ROW = st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=20)


@st.composite
def encoded_tables(draw: st.DrawFn) -> tuple[pa.Table, list[list[int]], list[int]]:
    """A table of rows and labels, cut into chunks that are each a slice of a larger table (offsets not at 0)."""
    rows = draw(st.lists(ROW, min_size=1, max_size=40))
    labels = draw(st.lists(st.integers(0, 1), min_size=len(rows), max_size=len(rows)))
    cuts = sorted(draw(st.sets(st.integers(1, len(rows) - 1), max_size=3))) if len(rows) > 1 else []
    chunks = []
    for start, stop in zip([0, *cuts], [*cuts, len(rows)], strict=True):
        before, after = draw(st.lists(ROW, max_size=3)), draw(st.lists(ROW, max_size=3))
        padded = [*before, *rows[start:stop], *after]
        chunk_labels = [0] * len(before) + labels[start:stop] + [1] * len(after)
        chunks.append(id_table(padded, chunk_labels).slice(len(before), stop - start))
    return pa.concat_tables(chunks), rows, labels


@PROPERTY
@given(encoded_tables(), st.data(), st.integers(0, 2**31 - 1))
def test_encoded_split_and_pad_collator_round_trip(
    table_rows_labels: tuple[pa.Table, list[list[int]], list[int]], data: st.DataObject, pad_id: int
) -> None:
    """from_arrow gives back every row and label; a collated batch of any of its examples holds each row's ids
    followed by pad_id, the true lengths and the labels as floats."""
    table, rows, labels = table_rows_labels
    split = EncodedSplit.from_arrow(table)
    assert len(split) == len(rows)
    assert split.offsets[0] == 0
    assert split.lengths.tolist() == [len(r) for r in rows]
    assert [split[i][0].tolist() for i in range(len(split))] == rows
    assert [split[i][1] for i in range(len(split))] == labels

    picked = data.draw(st.lists(st.integers(0, len(rows) - 1), min_size=1, max_size=16), label="batch")
    batch = PadCollator(pad_id)([split[i] for i in picked])
    width = max(len(rows[i]) for i in picked)
    assert batch["input_ids"].shape == (len(picked), width)
    assert batch["input_ids"].dtype == torch.int64
    for row, i in zip(batch["input_ids"].tolist(), picked, strict=True):
        assert row == rows[i] + [pad_id] * (width - len(rows[i]))
    assert batch["lengths"].tolist() == [len(rows[i]) for i in picked]
    assert batch["lengths"].dtype == torch.int64
    assert batch["labels"].dtype == torch.float32
    assert batch["labels"].tolist() == [float(labels[i]) for i in picked]
