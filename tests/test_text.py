"""Tests for sentiment.text: cleaning, spaCy pretokenization, WordLevel vocabulary, encoding, caching."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import spacy
from conftest import make_review, make_split
from tokenizers import Tokenizer

import sentiment.text
from sentiment.config import TrainConfig
from sentiment.data import load_imdb, split_imdb
from sentiment.prepare import prepare_data
from sentiment.text import (
    PAD_ID,
    PAD_TOKEN,
    UNK_ID,
    UNK_TOKEN,
    build_tokenizer,
    clean_text,
    encode_tokens,
    pretokenize,
)

# word ``w{i}`` appears i times: frequencies are distinct, so "the k most frequent" is unambiguous.
FREQ_CORPUS = [[f"w{i}"] * i for i in range(1, 21)]


def shuffled_corpus(seed: int = 0) -> list[list[str]]:
    """FREQ_CORPUS's words spread over several documents in random order (same counts)."""
    words = [w for doc in FREQ_CORPUS for w in doc]
    random.Random(seed).shuffle(words)
    return [words[i : i + 7] for i in range(0, len(words), 7)]


def words(tokenizer: Tokenizer) -> set[str]:
    """The vocabulary without the special tokens."""
    return set(tokenizer.get_vocab()) - {UNK_TOKEN, PAD_TOKEN}


# -------------------------------------------------------------------------------------------- cleaning


@pytest.mark.parametrize("br", ["<br />", "<br/>", "<BR>", "<br>", "<Br  />"])
def test_clean_text_removes_line_breaks(br: str) -> None:
    """Every spelling of IMDB's HTML line break becomes a space."""
    cleaned = clean_text(f"first part.{br}{br}Second part")
    assert "<" not in cleaned and ">" not in cleaned
    assert cleaned.split() == ["first", "part.", "Second", "part"]


def test_clean_text_keeps_other_text() -> None:
    """Text without line breaks is unchanged, including other angle brackets."""
    text = "a <b>bold</b> claim: 3 < 4 > 2"
    assert clean_text(text) == text


# ----------------------------------------------------------------------------------------------- spaCy


def test_spacy_alone_makes_br_tokens() -> None:
    """Precondition for the next test: raw spaCy does produce tokens like ``/><br`` on IMDB text."""
    tokens = [t.text for t in spacy.blank("en").tokenizer("It was fun.<br /><br />The end")]
    assert any("<br" in t or "/>" in t for t in tokens)


def test_pretokenize_drops_html_and_whitespace() -> None:
    """Fixture reviews pretokenize into words and punctuation: no HTML pieces, no whitespace tokens."""
    texts = [make_review(random.Random(seed), seed % 2) for seed in range(30)]
    texts.append("Spaced   out\n\ntext\t here <br /> <br /> end")
    token_lists = pretokenize(texts)
    assert len(token_lists) == len(texts)
    for text, tokens in zip(texts, token_lists, strict=True):
        assert tokens
        for token in tokens:
            assert token.strip() == token and token
            assert "<" not in token and ">" not in token and "/" not in token
        # nothing is lost: the tokens are the cleaned text without its whitespace
        assert "".join(tokens) == "".join(clean_text(text).split())


def test_pretokenize_splits_punctuation_and_contractions() -> None:
    """Punctuation is split off words; contractions become spaCy's two tokens ("don't" -> "do", "n't")."""
    [tokens] = pretokenize(["I don't like it.<br /><br />The movie was great, wasn't it?"])
    assert tokens == [
        "I", "do", "n't", "like", "it", ".", "The", "movie", "was", "great", ",", "was", "n't", "it", "?",
    ]  # fmt: skip


def test_pretokenize_empty_input() -> None:
    """No texts give no token lists; an empty string gives an empty list."""
    assert pretokenize([]) == []
    assert pretokenize([""]) == [[]]


# ------------------------------------------------------------------------------------------ vocabulary


def test_special_token_ids() -> None:
    """``<unk>`` is id 0 and ``<pad>`` id 1, and no word takes those ids."""
    tokenizer = build_tokenizer(shuffled_corpus())
    assert (UNK_ID, PAD_ID) == (0, 1)
    assert tokenizer.token_to_id(UNK_TOKEN) == 0
    assert tokenizer.token_to_id(PAD_TOKEN) == 1
    assert sorted(tokenizer.get_vocab().values()) == list(range(tokenizer.get_vocab_size()))


def test_full_vocabulary_without_limits() -> None:
    """With a large cap and min_freq 1 every word is kept."""
    tokenizer = build_tokenizer(shuffled_corpus(), max_vocab_size=1000)
    assert words(tokenizer) == {f"w{i}" for i in range(1, 21)}
    assert tokenizer.get_vocab_size() == 20 + 2


@pytest.mark.parametrize("cap", [1, 5, 12])
def test_max_vocab_size_keeps_most_frequent(cap: int) -> None:
    """max_vocab_size caps the words (vocab = cap + 2 specials) and keeps the most frequent ones."""
    tokenizer = build_tokenizer(shuffled_corpus(), max_vocab_size=cap)
    assert tokenizer.get_vocab_size() == cap + 2
    counts = Counter(w for doc in shuffled_corpus() for w in doc)
    assert words(tokenizer) == {w for w, _ in counts.most_common(cap)}


def test_more_frequent_words_get_smaller_ids() -> None:
    """Ids after the specials follow decreasing frequency."""
    tokenizer = build_tokenizer(shuffled_corpus())
    ids = [tokenizer.token_to_id(f"w{i}") for i in range(20, 0, -1)]
    assert ids == sorted(ids)
    assert min(ids) == 2


@pytest.mark.parametrize("min_freq", [2, 3, 10])
def test_min_freq_drops_rare_words(min_freq: int) -> None:
    """Words seen fewer than min_freq times are dropped; the others are kept."""
    tokenizer = build_tokenizer(shuffled_corpus(), min_freq=min_freq)
    assert words(tokenizer) == {f"w{i}" for i in range(min_freq, 21)}


def test_lowercase_merges_cases() -> None:
    """With lowercase, "Movie" and "movie" count as one word, which then outranks "plot"."""
    corpus = [["Movie"] * 3 + ["movie"] * 2 + ["plot"] * 4]
    assert words(build_tokenizer(corpus, max_vocab_size=1)) == {"plot"}
    lowered = build_tokenizer(corpus, max_vocab_size=1, lowercase=True)
    assert words(lowered) == {"movie"}
    movie = lowered.token_to_id("movie")
    assert encode_tokens(lowered, [["MOVIE", "Movie", "movie"]]) == [[movie] * 3]


def test_lowercase_lives_in_tokenizer_json(tmp_path: Path) -> None:
    """The lowercasing is saved in tokenizer.json, so the reloaded tokenizer lowercases too."""
    path = tmp_path / "tokenizer.json"
    build_tokenizer([["The", "the", "Plot"]], lowercase=True).save(str(path))
    assert json.loads(path.read_text())["normalizer"] == {"type": "Lowercase"}
    reloaded = Tokenizer.from_file(str(path))
    assert encode_tokens(reloaded, [["THE", "plot"]]) == [[reloaded.token_to_id("the"), reloaded.token_to_id("plot")]]
    plain = tmp_path / "plain.json"
    build_tokenizer([["The", "the", "Plot"]]).save(str(plain))
    assert json.loads(plain.read_text())["normalizer"] is None


def test_without_lowercase_case_matters() -> None:
    """Without lowercase, "The" and "the" are different entries."""
    tokenizer = build_tokenizer([["The", "the"]])
    assert tokenizer.token_to_id("The") != tokenizer.token_to_id("the")
    assert encode_tokens(tokenizer, [["THE"]]) == [[UNK_ID]]


@pytest.mark.parametrize("max_length", [1, 3, 7])
def test_max_length_truncates(max_length: int) -> None:
    """max_length keeps the first max_length ids; shorter texts are untouched."""
    corpus = shuffled_corpus()
    tokenizer = build_tokenizer(corpus, max_length=max_length)
    full = build_tokenizer(corpus)
    long_text = [f"w{i}" for i in range(1, 11)]
    [ids] = encode_tokens(tokenizer, [long_text])
    assert ids == encode_tokens(full, [long_text])[0][:max_length]
    assert encode_tokens(tokenizer, [["w5"]]) == [[full.token_to_id("w5")]]


def test_unknown_words_map_to_unk() -> None:
    """Words outside the vocabulary get id 0."""
    tokenizer = build_tokenizer(shuffled_corpus(), min_freq=2)
    assert encode_tokens(tokenizer, [["w1", "nonsenseword", "w2"]]) == [[UNK_ID, UNK_ID, tokenizer.token_to_id("w2")]]


def test_encode_tokens_maps_words_to_their_ids() -> None:
    """Each known word is encoded to its vocabulary id, in order."""
    tokenizer = build_tokenizer(shuffled_corpus())
    text = ["w3", "w20", "w3", "w7"]
    assert encode_tokens(tokenizer, [text]) == [[tokenizer.token_to_id(w) for w in text]]


def test_encode_empty_text_is_single_unk() -> None:
    """An empty token list becomes ``[0]`` so no review has length zero."""
    tokenizer = build_tokenizer(shuffled_corpus())
    assert encode_tokens(tokenizer, [[], ["w4"], []]) == [[UNK_ID], [tokenizer.token_to_id("w4")], [UNK_ID]]


def test_tokenizer_save_and_reload(tmp_path: Path) -> None:
    """tokenizer.json reloads with the same vocabulary and the same encodings (unknown words included)."""
    token_lists = pretokenize(make_split(40, 9)[0])
    tokenizer = build_tokenizer(token_lists[:30], max_vocab_size=25, max_length=20)
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    reloaded = Tokenizer.from_file(str(path))
    assert reloaded.get_vocab() == tokenizer.get_vocab()
    held_out = [*token_lists[30:], ["neverseenword"], []]
    assert encode_tokens(reloaded, held_out) == encode_tokens(tokenizer, held_out)
    assert all(len(ids) <= 20 for ids in encode_tokens(reloaded, held_out))


# ---------------------------------------------------------------------------------------- prepare_data


def write_hub(root: Path, train: list[str], test: list[str]) -> Path:
    """A hub-layout folder with the given train/test texts (labels balanced, sorted like IMDB)."""
    (root / "plain_text").mkdir(parents=True)
    for split, texts in (("train", train), ("test", test)):
        labels = [0] * (len(texts) // 2) + [1] * (len(texts) - len(texts) // 2)
        table = pa.table({"text": texts, "label": pa.array(labels, pa.int64())})
        pq.write_table(table, root / "plain_text" / f"{split}-00000-of-00001.parquet")
    return root


def small_config(root: Path, **overrides: object) -> TrainConfig:
    """A config for quick data preparation of ``root`` without vectors or tracking, in-process."""
    values: dict = {"dataset": str(root), "report_to": "none", "vectors": "none", "num_proc": 1}
    return TrainConfig(**{**values, **overrides})


def test_vocabulary_built_from_train_only(tmp_path: Path) -> None:
    """The vocabulary is exactly the train split's words: a test-only word is unknown, a train word known."""
    train_texts = [f"{t} trainonlyword" for t in make_split(60, 11)[0]]
    test_texts = [f"{t} zqxtestonlyword" for t in make_split(40, 12)[0]]
    root = write_hub(tmp_path / "imdb", train_texts, test_texts)
    cfg = small_config(root)
    data = prepare_data(cfg, cache_dir=str(tmp_path / "cache"))

    assert data.tokenizer.token_to_id("zqxtestonlyword") is None
    assert data.tokenizer.token_to_id("trainonlyword") is not None
    # every test review holds the test-only word, so every test review holds an <unk>
    test = data.splits["test"]
    assert all(UNK_ID in test[i][0] for i in range(len(test)))

    # the vocabulary is the set of words of the train part (validation held out), derived independently
    splits = split_imdb(load_imdb(str(root)), cfg.split_scheme, cfg.validation_fraction, cfg.split_seed)
    train_words = {w for tokens in pretokenize(splits["train"]["text"]) for w in tokens}
    assert words(data.tokenizer) == train_words
    assert data.info["vocab_size"] == len(train_words) + 2


def test_prepare_encodes_like_the_tokenizer(hub_imdb: Path, tmp_path: Path) -> None:
    """prepare_data's ids for each review equal pretokenize + encode_tokens with its own tokenizer."""
    cfg = small_config(hub_imdb, max_vocab_size=15)
    data = prepare_data(cfg, cache_dir=str(tmp_path / "cache"))
    assert data.tokenizer.get_vocab_size() == 15 + 2
    splits = split_imdb(load_imdb(str(hub_imdb)), cfg.split_scheme, cfg.validation_fraction, cfg.split_seed)
    for name in ("train", "validation", "test"):
        expected = encode_tokens(data.tokenizer, pretokenize(splits[name]["text"]))
        split = data.splits[name]
        assert [split[i][0].tolist() for i in range(len(split))] == expected
        assert split.labels.tolist() == splits[name]["label"]


def test_second_prepare_reads_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second prepare_data with the same settings does no spaCy tokenization and no encoding."""
    root = write_hub(tmp_path / "imdb", make_split(50, 21)[0], make_split(30, 22)[0])
    cfg = small_config(root, max_vocab_size=30)
    cache = str(tmp_path / "cache")
    calls = Counter()
    real_pretokenize, real_encode = sentiment.text.pretokenize_joined, sentiment.text.encode_joined

    def counting_pretokenize(texts: list[str]) -> list[str]:
        calls["pretokenize"] += len(texts)
        return real_pretokenize(texts)

    def counting_encode(tokenizer: Tokenizer, joined: list[str]) -> list[list[int]]:
        calls["encode"] += len(joined)
        return real_encode(tokenizer, joined)

    monkeypatch.setattr(sentiment.text, "pretokenize_joined", counting_pretokenize)
    monkeypatch.setattr(sentiment.text, "encode_joined", counting_encode)
    first = prepare_data(cfg, cache_dir=cache)
    assert calls == {"pretokenize": 80, "encode": 80}  # the first run did the work, every review once

    def fail(*args: object) -> None:
        raise AssertionError("tokenization ran again despite the cache")

    monkeypatch.setattr(sentiment.text, "pretokenize_joined", fail)
    monkeypatch.setattr(sentiment.text, "encode_joined", fail)
    monkeypatch.setattr(sentiment.text, "_train_word_level", fail)  # the vocabulary comes from the cache too
    second = prepare_data(cfg, cache_dir=cache)
    assert second.tokenizer.get_vocab() == first.tokenizer.get_vocab()
    for name, split in first.splits.items():
        assert second.splits[name].token_ids.tolist() == split.token_ids.tolist()
        assert second.splits[name].offsets.tolist() == split.offsets.tolist()
        assert second.splits[name].labels.tolist() == split.labels.tolist()


def test_changed_settings_do_not_reuse_the_encoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A different vocabulary size reuses the spaCy tokens but encodes again with the new vocabulary."""
    root = write_hub(tmp_path / "imdb", make_split(50, 31)[0], make_split(30, 32)[0])
    cache = str(tmp_path / "cache")
    prepare_data(small_config(root, max_vocab_size=30), cache_dir=cache)

    def fail(*args: object) -> None:
        raise AssertionError("spaCy ran again although the split did not change")

    monkeypatch.setattr(sentiment.text, "pretokenize", fail)
    small = prepare_data(small_config(root, max_vocab_size=5), cache_dir=cache)
    assert small.tokenizer.get_vocab_size() == 5 + 2
    assert int(small.splits["train"].token_ids.max()) == 5 + 1
