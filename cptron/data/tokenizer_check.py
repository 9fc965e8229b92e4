"""Which tokenizer made a run's shards: owns comparing the tokenizer fingerprints recorded in the shard
sidecars across every shard of a mixture and against the model's tokenizer, and refusing a mismatch
(or, with data.allow_tokenizer_mismatch, warning about it).

A fingerprint is what `cptron data tokenize` records: the sha256 of the tokenizer file it read
(`cptron.data.tokenize.tokenizer_fingerprint`). Shards written by other tools (megatron-core) or by
older cptron versions record none; they are reported once in the log and not checked. Token ids below
the model's vocabulary size are all the loader can verify without a fingerprint, and two tokenizers of
one vocabulary size (Llama 2 and Mistral: 32000) pass that check while meaning different text.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

from cptron.data.sample_index import SourceIndex
from cptron.data.tokenize import resolve_tokenizer_file, tokenizer_fingerprint
from cptron.distributed import get_rank
from cptron.errors import CptronError

log = logging.getLogger("cptron.data")

_SHOWN = 16  # hex digits of a fingerprint in messages: enough to tell tokenizers apart
_OVERRIDE = "data.allow_tokenizer_mismatch"


def model_tokenizer_fingerprints(path: str | os.PathLike) -> tuple[Path, set[str]]:
    """(the file `cptron data tokenize --tokenizer <path>` reads, the fingerprints that mean this tokenizer).

    For a directory, its tokenizer.json and tokenizer.model both count: an HF model directory holds
    the one tokenizer in both forms, and shards may have been tokenized from either file."""
    file, _ = resolve_tokenizer_file(path)
    files = {file}
    if Path(path).is_dir():
        files |= {Path(path) / n for n in ("tokenizer.json", "tokenizer.model") if (Path(path) / n).is_file()}
    return file, {tokenizer_fingerprint(f) for f in files}


def _shard(source: str, prefix: str, fingerprint: str) -> str:
    return f"data.sources.{source} shard {prefix} (tokenizer sha256 {fingerprint[:_SHOWN]})"


def tokenizer_mismatch(
    sources: dict[str, SourceIndex], model_tokenizer: Optional[str | os.PathLike]
) -> Optional[tuple[str, str]]:
    """(what differs, what to do) for the first shard whose tokenizer differs from the model's (or, when
    the model's tokenizer is unknown, from the other shards'), or None. Logs once (rank 0) what it cannot check.
    Reads the fingerprints the shards' sidecars held when they were opened; hashes the model's tokenizer."""
    notes = get_rank() == 0
    known, unknown = [], []
    for name in sorted(sources):
        for shard in sources[name].shards:
            fp = shard.tokenizer_fingerprint
            (known if fp else unknown).append((name, shard.path_prefix, fp))
    if unknown and notes:
        log.info(
            "%d of %d shard(s) record no tokenizer fingerprint (e.g. data.sources.%s shard %s; written by "
            "megatron-core or an older cptron): which tokenizer made them cannot be checked",
            len(unknown),
            len(known) + len(unknown),
            unknown[0][0],
            unknown[0][1],
        )
    if not known:
        return None
    if model_tokenizer:
        try:
            file, accepted = model_tokenizer_fingerprints(model_tokenizer)
        except CptronError as e:
            if notes:
                log.warning("the shards' tokenizer cannot be checked against the model's: %s", e)
        else:
            bad = next((k for k in known if k[2] not in accepted), None)
            if bad is None:
                return None
            ours = ", ".join(sorted(fp[:_SHOWN] for fp in accepted))
            return (
                f"{_shard(*bad)} was not tokenized with the model's tokenizer {file} (sha256 {ours})",
                "retokenize it with the model's tokenizer, or set training.tokenizer to the one it was made with",
            )
    elif notes:
        log.info(
            "the model's tokenizer is unknown (no training.tokenizer, none beside checkpoint.init_from or in "
            "the resumed checkpoint): the shards are checked against each other only"
        )
    first = known[0]
    other = next((k for k in known if k[2] != first[2]), None)
    if other is None:
        return None
    return (
        f"{_shard(*other)} and {_shard(*first)} were tokenized with different tokenizers",
        "retokenize them with the model's tokenizer",
    )


def check_tokenizers(
    sources: dict[str, SourceIndex], model_tokenizer: Optional[str | os.PathLike], *, allow_mismatch: bool
) -> None:
    """Raise CptronError on a tokenizer mismatch (see `tokenizer_mismatch`), or with `allow_mismatch`
    log it as a warning (rank 0) and return."""
    found = tokenizer_mismatch(sources, model_tokenizer)
    if found is None:
        return
    problem, remedy = found
    if allow_mismatch:
        if get_rank() == 0:
            log.warning("%s; training anyway (%s=true)", problem, _OVERRIDE)
        return
    raise CptronError(f"{problem}: {remedy}, or set {_OVERRIDE}=true to train anyway")


__all__ = ["check_tokenizers", "model_tokenizer_fingerprints", "tokenizer_mismatch"]
