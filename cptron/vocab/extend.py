"""`cptron vocab extend`: add target-language tokens to a base tokenizer and report what they change.

Owns `VocabExtendConfig`, reading the texts, the checks every extension must pass (old ids unchanged, exact
round trip, every new token reachable), the fertility report, and writing the output directory atomically.
The kind-specific work lives in `sentencepiece_extend` (Llama-2, Mistral) and `bpe_extend` (Llama 3, Qwen2).

The output is a complete tokenizer directory that `transformers.AutoTokenizer` loads: tokenizer.json for both
kinds (plus tokenizer.model for SentencePiece bases), the base's HF configs, and vocab_extension_report.json.
Ids below the report's `first_new_id` are the base's, unchanged; the ones from it on are new. On a byte-level
BPE base some new tokens may be parts of UTF-8 characters, added as steps towards whole-character tokens; the
report counts them apart (`checks.partial_character_tokens`), since they have no text to be reached on.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tqdm import tqdm

from cptron.checkpoint import check_replaceable, replace_dir, side_dirs
from cptron.data.readers import InputFormat, expand_inputs, read_documents
from cptron.errors import CptronError, require
from cptron.vocab.base_tokenizer import SENTENCEPIECE, BaseTokenizer, ExtendedTokenizer, read_base_tokenizer

log = logging.getLogger("cptron.vocab")

REPORT_FILE = "vocab_extension_report.json"
_EXAMPLES = 20


@dataclass
class VocabExtendConfig:
    """Extend a tokenizer with target-language tokens (SentencePiece or byte-level BPE) and report the gain."""

    base: str = ""
    """Tokenizer directory, HF model directory holding one, or a bare tokenizer.model / tokenizer.json."""
    inputs: list[str] = field(default_factory=list)
    """Target-language text files or globs the new tokens are learned from, comma-separated (as data tokenize)."""
    input_format: InputFormat = "auto"
    """Format of every input; auto picks by extension (.jsonl/.json[.gz] jsonl, .parquet, anything else text)."""
    text_field: str = "text"
    """Key (jsonl) or column (parquet) holding a document's text."""
    text_unit: Literal["line", "file"] = "line"
    """Plain text only: one document per line, or one document per file."""
    new_tokens: int = 8000
    """Most tokens to add; fewer when the target text yields fewer new ones."""
    output: str = ""
    """Directory to write: the extended tokenizer files and vocab_extension_report.json."""
    eval_inputs: list[str] = field(default_factory=list)
    """Held-out target-language text for the report and the checks; none: the inputs themselves."""
    source_inputs: list[str] = field(default_factory=list)
    """Source-language text (e.g. English) for the report: its fertility and how many documents keep their
    segmentation; none: not measured."""
    protected_inputs: list[str] = field(default_factory=list)
    """Source-language text whose segmentation must stay the base's: new tokens it would use (names both
    languages share, e.g. Yahweh) are dropped and the next candidates take their place; none: no such filter."""
    max_documents: int = 0
    """Most documents read from each of inputs, eval_inputs, source_inputs and protected_inputs (0: all)."""
    target_vocab_size: int = 0
    """Size of the target-language tokenizer trained on the inputs (0: grown until it yields new_tokens new
    tokens or the text runs out)."""
    seed: int = 0
    """Seed of the target tokenizer's training (SentencePiece's sampling; BPE training is deterministic)."""
    overwrite: bool = False
    """Replace `output` if it exists."""
    progress: bool = True
    """Show a progress bar while reading the texts."""

    def validate(self) -> None:
        require(bool(self.base), "base", self.base, "a tokenizer directory, an HF model directory or a tokenizer file")
        require(Path(self.base).exists(), "base", self.base, "an existing tokenizer directory or file")
        require(bool(self.inputs), "inputs", self.inputs, "at least one target-language text file or glob")
        for name in ("inputs", "eval_inputs", "source_inputs", "protected_inputs"):
            require(all(bool(p) for p in getattr(self, name)), name, getattr(self, name), "no empty paths")
        require(bool(self.text_field), "text_field", self.text_field, "a non-empty field name")
        require(self.new_tokens >= 1, "new_tokens", self.new_tokens, "an integer >= 1")
        require(bool(self.output), "output", self.output, "a directory path")
        # --overwrite replaces the whole output directory: one holding the base would delete it.
        require(
            not Path(self.base).resolve().is_relative_to(Path(self.output).resolve()),
            "output",
            self.output,
            "a directory other than the base and not one holding it",
        )
        require(self.max_documents >= 0, "max_documents", self.max_documents, "an integer >= 0 (0: all)")
        require(
            self.target_vocab_size == 0 or self.target_vocab_size > self.new_tokens,
            "target_vocab_size",
            self.target_vocab_size,
            "0 (automatic) or more than new_tokens",
        )


# ------------------------------------------------------------------ texts and measures


def read_texts(cfg: VocabExtendConfig, name: str) -> list[str]:
    """The non-empty documents of the config's `name` field (inputs, eval_inputs, source_inputs, ...)."""
    patterns = getattr(cfg, name)
    try:
        files = expand_inputs(patterns)
    except CptronError as e:
        raise CptronError(f"{name}: {e}") from e
    texts, empty = [], 0
    bar = tqdm(desc=f"reading {name}", unit="doc", disable=not cfg.progress)
    for path in files:
        for _, text, _ in read_documents(path, cfg.input_format, cfg.text_field, cfg.text_unit):
            if text is None or not text.strip():
                empty += 1
                continue
            texts.append(text)
            bar.update(1)
            if cfg.max_documents and len(texts) >= cfg.max_documents:
                break
        if cfg.max_documents and len(texts) >= cfg.max_documents:
            break
    bar.close()
    if not texts:
        raise CptronError(f"{name}={patterns} hold no non-empty document ({empty} empty): expected text to read")
    log.info("read %d documents from %d file(s) of %s (%d empty skipped)", len(texts), len(files), name, empty)
    return texts


def _measure(ids: list[list[int]], texts: list[str]) -> dict[str, Any]:
    tokens = sum(map(len, ids))
    words = sum(len(t.split()) for t in texts)
    chars = sum(map(len, texts))
    return {
        "tokens": tokens,
        "fertility": tokens / max(words, 1),
        "chars_per_token": chars / max(tokens, 1),
    }


def _compare(ext: ExtendedTokenizer, texts: list[str], name: str) -> tuple[dict[str, Any], list, list]:
    before, after = ext.encode_base(texts), ext.encode_new(texts)
    b, a = _measure(before, texts), _measure(after, texts)
    report = {
        "documents": len(texts),
        "words": sum(len(t.split()) for t in texts),
        "characters": sum(map(len, texts)),
        "before": b,
        "after": a,
        "fertility_change": a["fertility"] / b["fertility"] - 1 if b["fertility"] else 0.0,
        "unchanged_share": sum(x == y for x, y in zip(before, after)) / len(texts),
    }
    log.info("%s text: fertility %.3f -> %.3f", name, b["fertility"], a["fertility"])
    return report, before, after


# ------------------------------------------------------------------ checks


def _check_ids(ext: ExtendedTokenizer) -> None:
    moved = [(t, i, ext.new_vocab.get(t)) for t, i in ext.old_vocab.items() if ext.new_vocab.get(t) != i]
    if moved:
        t, i, j = moved[0]
        raise CptronError(f"internal error: {len(moved)} old tokens changed id, e.g. {t!r} {i} -> {j}; nothing written")
    if len(set(ext.new_vocab.values())) != len(ext.new_vocab):
        raise CptronError("internal error: two tokens of the extended tokenizer share an id; nothing written")
    low = [(t, i) for t, i in ext.new_vocab.items() if t not in ext.old_vocab and i < ext.first_new_id]
    if low:
        raise CptronError(f"internal error: new token {low[0][0]!r} has id {low[0][1]} < {ext.first_new_id}")


def _round_trip(ext: ExtendedTokenizer, texts: list[str], before: list, after: list) -> dict[str, int]:
    """Documents that do not decode back to themselves; the extension may not add any to the base's."""
    base_fail = {i for i, ids in enumerate(before) if ext.decode_base(ids) != texts[i]}
    new_fail = {i for i, ids in enumerate(after) if ext.decode_new(ids) != texts[i]}
    regressions = sorted(new_fail - base_fail)
    if regressions:
        text = texts[regressions[0]]
        raise CptronError(
            f"the extended tokenizer does not round-trip {len(regressions)} documents the base does, e.g. "
            f"{text[:80]!r} -> {ext.decode_new(after[regressions[0]])[:80]!r}; nothing written"
        )
    return {"documents": len(texts), "failures": len(new_fail), "base_failures": len(base_fail)}


# ------------------------------------------------------------------ output


def _write(out: Path, files: dict[str, bytes], overwrite: bool) -> None:
    check_replaceable(out, overwrite)
    tmp, _ = side_dirs(out)
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a killed run; never read
    tmp.mkdir(parents=True)
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk leaves no half-written directory behind
        raise
    replace_dir(tmp, out)


def _output_files(base: BaseTokenizer, ext: ExtendedTokenizer, report: dict) -> dict[str, bytes]:
    files = dict(ext.files)
    for name, value in base.configs.items():
        files.setdefault(name, (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    files.update(base.verbatim)
    files[REPORT_FILE] = (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    return files


def format_report(report: dict) -> str:
    """The report as a few readable lines."""
    lines = [
        f"vocab extend: {report['kind']} base {report['base']} ({report['old_vocab_size']} ids) -> "
        f"{report['output']} ({report['new_vocab_size']} ids)",
        f"  added {report['tokens_added']} tokens (asked for at most {report['tokens_requested']}), "
        f"ids {report['first_new_id']}..{report['new_vocab_size'] - 1}",
    ]
    for side in ("target", "source"):
        m = report.get(side)
        if not m:
            continue
        b, a = m["before"], m["after"]
        lines.append(
            f"  {side} text ({m['documents']} documents, {m['words']} words): fertility {b['fertility']:.3f} -> "
            f"{a['fertility']:.3f} ({100 * m['fertility_change']:+.1f}%), characters per token "
            f"{b['chars_per_token']:.2f} -> {a['chars_per_token']:.2f}, segmentation unchanged in "
            f"{100 * m['unchanged_share']:.1f}% of documents"
        )
    c = report["checks"]
    lines.append(
        f"  checks: old ids unchanged; round trip exact on {c['round_trip']['documents']} documents "
        f"(failures {c['round_trip']['failures']}, base {c['round_trip']['base_failures']}); unreachable tokens: "
        f"{c['unreachable_new_tokens']} of {c['new_tokens_checked']} new, base {c['unreachable_base_tokens']} of "
        f"{c['base_tokens_checked']}"
    )
    p = c.get("partial_character_tokens")
    if p:
        lines.append(
            f"  partial-character tokens (reached: a byte UTF-8 can hold, or formed on the way to a reachable token): "
            f"{p['new']} new, {p['new_unreached']} unreached; base {p['base']}, {p['base_unreached']} unreached"
        )
    if report.get("examples"):
        lines.append("  first new tokens: " + " ".join(repr(t) for t in report["examples"]))
    return "\n".join(lines)


# ------------------------------------------------------------------ command


def run_vocab_extend(cfg: VocabExtendConfig) -> dict:
    """Extend `cfg.base` with tokens learned from `cfg.inputs`, check the result, write it and its report."""
    cfg.validate()
    out = Path(cfg.output)
    check_replaceable(out, cfg.overwrite)  # before any work: _write checks again at the end
    base = read_base_tokenizer(cfg.base)
    log.info("base tokenizer %s: %s", base.path, base.kind)
    texts = read_texts(cfg, "inputs")
    eval_texts = read_texts(cfg, "eval_inputs") if cfg.eval_inputs else texts
    source_texts = read_texts(cfg, "source_inputs") if cfg.source_inputs else []
    protected = read_texts(cfg, "protected_inputs") if cfg.protected_inputs else []

    if base.kind == SENTENCEPIECE:
        from cptron.vocab.sentencepiece_extend import extend_sentencepiece

        ext = extend_sentencepiece(base, texts, cfg.new_tokens, cfg.target_vocab_size, cfg.seed, protected)
    else:
        from cptron.vocab.bpe_extend import extend_byte_level_bpe

        ext = extend_byte_level_bpe(base, texts, cfg.new_tokens, cfg.target_vocab_size, protected)

    _check_ids(ext)
    target, t_before, t_after = _compare(ext, eval_texts, "target")
    source, s_before, s_after = _compare(ext, source_texts, "source") if source_texts else (None, [], [])
    round_trip = _round_trip(ext, eval_texts + source_texts, t_before + s_before, t_after + s_after)
    if ext.unreachable_new:
        raise CptronError(f"internal error: new tokens {ext.unreachable_new[:3]} are unreachable; nothing written")
    if ext.partial and ext.partial["new_unreached"]:
        raise CptronError(
            f"internal error: {ext.partial['new_unreached']} new partial-character tokens are made on the way to no "
            "reachable token; nothing written"
        )
    new_checked = ext.new_size - ext.first_new_id if ext.new_checked is None else ext.new_checked
    report = {
        "base": str(cfg.base),
        "output": str(out),
        "kind": base.kind,
        "tokens_requested": cfg.new_tokens,
        "tokens_added": ext.new_size - ext.first_new_id,
        "old_vocab_size": ext.old_size,
        "new_vocab_size": ext.new_size,
        "first_new_id": ext.first_new_id,
        "target": target,
        "source": source,
        "checks": {
            "old_ids_unchanged": True,
            "round_trip": round_trip,
            "unreachable_new_tokens": len(ext.unreachable_new),
            "new_tokens_checked": new_checked,
            "unreachable_base_tokens": ext.unreachable_base,
            "base_tokens_checked": ext.base_checked,
            **({"partial_character_tokens": ext.partial} if ext.partial is not None else {}),
        },
        **ext.details,
        "examples": ext.added[:_EXAMPLES],
    }
    if ext.check_text is not None:
        report["checks"].update(ext.check_text(eval_texts + source_texts))
    _write(out, _output_files(base, ext, report), cfg.overwrite)
    print(format_report(report))
    log.info("wrote %s", out)
    return report


__all__ = ["REPORT_FILE", "VocabExtendConfig", "format_report", "read_texts", "run_vocab_extend"]
