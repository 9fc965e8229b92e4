"""Offline test fixtures: real multilingual text and real tokenizers.

Nothing here touches the network.  The text is a verse-aligned excerpt of two
public-domain Bibles shipped in ``data/bible/`` (see PROVENANCE.md there), the
BPE tokenizer is trained on that text in well under a second, and the
SentencePiece model is the Apache-2.0 Mistral-7B v1 model that the
``mistral-common`` package ships.

* :func:`bible_text` -- needs only the files in ``data/bible/``.
* :func:`train_bpe_tokenizer` -- needs ``tokenizers`` and ``transformers``.
* :func:`mistral_sentencepiece_path` -- needs ``mistral-common`` installed.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "BIBLE_DIR",
    "BIBLE_FILES",
    "bible_dir",
    "bible_refs",
    "bible_text",
    "train_bpe_tokenizer",
    "mistral_sentencepiece_path",
]

# Repo layout: <root>/cptron/testing/fixtures.py and <root>/data/bible/.
BIBLE_DIR = Path(__file__).resolve().parents[2] / "data" / "bible"
BIBLE_FILES = {"en": "web.txt", "de": "elberfelder.txt"}
_REFS_FILE = "refs.txt"

MISTRAL_SP_RELPATH = Path("data") / "tokenizer.model.v1"


def bible_dir() -> Path:
    """Directory holding the shipped Bible text; raises if it is missing."""
    if not BIBLE_DIR.is_dir():
        raise FileNotFoundError(
            f"Bible test corpus directory not found at {BIBLE_DIR}. The fixtures expect a "
            "source checkout of cptron (installed with `pip install -e .`) that contains "
            "data/bible/; regenerate it with data/bible/make_bible_text.py."
        )
    return BIBLE_DIR


def _read_lines(name: str, n: int | None) -> list[str]:
    if n is not None and n < 0:
        raise ValueError(f"n must be >= 0 or None, got {n}")
    path = bible_dir() / name
    if not path.is_file():
        raise FileNotFoundError(
            f"Bible test corpus file not found at {path}; regenerate it with data/bible/make_bible_text.py."
        )
    lines = path.read_text(encoding="utf-8").splitlines()
    return lines if n is None else lines[:n]


def bible_text(lang: str = "en", n: int | None = None) -> list[str]:
    """Return the shipped verses, one string per verse, in canonical order.

    ``lang="en"`` is the World English Bible, ``lang="de"`` the Elberfelder 1905.
    Both lists are verse-aligned: item *i* of each is the same verse
    (:func:`bible_refs` gives its reference).  ``n`` keeps only the first ``n``.
    """
    try:
        name = BIBLE_FILES[lang]
    except KeyError:
        raise ValueError(f"unknown language {lang!r}; expected one of {sorted(BIBLE_FILES)}") from None
    return _read_lines(name, n)


def bible_refs(n: int | None = None) -> list[str]:
    """References (``"Genesis 1:1"``) of the lines returned by :func:`bible_text`."""
    return _read_lines(_REFS_FILE, n)


def train_bpe_tokenizer(
    out_dir: str | Path,
    vocab_size: int = 512,
    texts: Iterable[str] | None = None,
    bos: str = "<s>",
    eos: str = "</s>",
    unk: str = "<unk>",
    *,
    pad: str = "<pad>",
    add_bos: bool = True,
) -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE tokenizer and save it to ``out_dir``.

    Trained on the shipped English and German verses unless ``texts`` is
    given.  Special tokens get Llama's ids: ``unk=0, bos=1, eos=2`` and a
    dedicated ``pad=3``.  Like Llama, ``encode`` prepends BOS when ``add_bos``
    (the default) and never appends EOS.  Byte-level pre-tokenization without
    a prefix space makes ``decode(encode(x), skip_special_tokens=True) == x``
    for any string.  The result is saved with ``save_pretrained`` so that
    ``AutoTokenizer.from_pretrained(out_dir)`` loads it offline.  Training is
    deterministic: the same text and settings give the same vocab and merges.
    """
    # Deferred: transformers takes seconds to import, and most users of these fixtures never train a tokenizer.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [unk, bos, eos, pad]
    if len(set(specials)) != len(specials):
        raise ValueError(f"special tokens must be distinct, got {specials}")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    min_size = len(alphabet) + len(specials)
    if vocab_size < min_size:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least "
            f"{min_size} ids (256 bytes + {len(specials)} special tokens)"
        )
    if texts is None:
        texts = bible_text("en") + bible_text("de")
    else:
        texts = [t for t in texts]
    if not texts:
        raise ValueError("texts is empty; nothing to train a tokenizer on")

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))

    bos_id = tok.token_to_id(bos)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, bos_id)],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token=pad,
        clean_up_tokenization_spaces=False,
        padding_side="right",
        model_max_length=4096,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_tok.save_pretrained(str(out_dir))
    _portable_tokenizer_class(out_dir / "tokenizer_config.json")
    return hf_tok


def _portable_tokenizer_class(config_path: Path) -> None:
    """Name the class ``PreTrainedTokenizerFast`` in the saved config.

    transformers 5 writes ``TokenizersBackend``, which transformers 4.x cannot
    resolve; ``PreTrainedTokenizerFast`` loads the same tokenizer.json in both.
    """
    if not config_path.is_file():
        return
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(
            json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
            encoding="utf-8",
        )


def mistral_sentencepiece_path() -> Path:
    """Path to the Mistral-7B v1 SentencePiece model (32000 pieces, Apache-2.0).

    The file ships inside the ``mistral-common`` package as
    ``mistral_common/data/tokenizer.model.v1``; the package is located without
    importing it.
    """
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "mistral-common is not installed; `pip install mistral-common` to get the "
            "Mistral-7B SentencePiece model (mistral_common/data/tokenizer.model.v1)",
            name="mistral_common",
        )
    for root in spec.submodule_search_locations:
        path = Path(root) / MISTRAL_SP_RELPATH
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"mistral-common is installed at {list(spec.submodule_search_locations)} but "
        f"{MISTRAL_SP_RELPATH} is missing from it; this mistral-common version no longer "
        "ships the v1 SentencePiece model"
    )
