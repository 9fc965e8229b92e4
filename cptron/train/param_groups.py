"""Which parameters train, and how: groups by name pattern, frozen parameters, new rows only.

Owns resolving `optim.param_groups`, `optim.frozen` and `optim.train_new_rows_only` against
the model's parameter names into a `TrainablePlan`, and what the plan does to a rank's model
parts: freezing parameters before a part is parallelized, the AdamW param groups of a part, and
for new-rows-only training the gradient mask of the old embedding rows, the weight decay of the
new rows alone and the zeroing of old rows' optimizer moments.

Names are those of a cptron checkpoint (`layers.3.attention.wq.weight`) whatever the layout:
activation-checkpoint and compile wrappers are stripped (FSDP2 adds no segment), a pipeline
stage keeps the full model's names, and a tied model has only `tok_embeddings.weight` (a last
pipeline stage's `output.weight` copy answers to that name, as in checkpoints).

New-rows-only training keeps rows below `new_rows_from` and the padding rows (ids at or above
the tokenizer's vocabulary, `model.pad_vocab_to_multiple_of`) bit-exact: their gradients are
zeroed after the last backward and before the global norm, on each rank's local shard (rows
are sharded by FSDP2 over dp_shard and by the vocab-parallel embedding and head over tp), so
AdamW's moments of those rows stay zero and its update of them is zero. AdamW's decoupled
decay would still shrink them, so these tensors' AdamW groups get weight decay 0 and the plan
multiplies the new rows alone by (1 - lr * weight_decay) right before `step`, the factor AdamW
applies (Loshchilov & Hutter, 2019, "Decoupled Weight Decay Regularization").
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from cptron import checkpoint as ckpt
from cptron.distributed import local_shard_region, raise_on_every_rank
from cptron.errors import ConfigError, CptronError, invalid
from cptron.models.config import ModelConfig
from cptron.models.llama import Transformer, canonical_param_name
from cptron.train.optim import OptimizerConfig
from cptron.vocab.init import VOCAB_EXTENSION_FILE

log = logging.getLogger("cptron.train")

ROW_PARAMS = ("tok_embeddings.weight", "output.weight")
"""The parameters whose rows are token ids: trained from new_rows_from on with train_new_rows_only."""
_TIED_COPY, _TIED_NAME = "output.weight", "tok_embeddings.weight"
_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


@dataclass(frozen=True)
class ParamRule:
    """How one trainable parameter trains."""

    lr_scale: float
    weight_decay: float
    group: Optional[int]
    """Index in optim.param_groups; None: the defaults."""
    rows: Optional[tuple[int, int]]
    """[start, stop) of the rows that train (the rest masked); None: the whole tensor."""


def model_param_shapes(model_cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of the full model by checkpoint name (a tied head once), with its shape."""
    with torch.device("meta"):
        model = Transformer(model_cfg)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def read_old_vocab_size(init_from: str) -> int:
    """`old_vocab_size` from `vocab_extension.json` in the init_from directory (CptronError naming the file)."""
    path = Path(init_from) / VOCAB_EXTENSION_FILE
    if not path.is_file():
        raise ConfigError(
            f"optim.new_rows_from=0 is invalid: expected the first new token id, or {path} (written by "
            "`cptron vocab init`) to give old_vocab_size, but it does not exist"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CptronError(f"{path}: cannot read it as JSON: {e}") from e
    n = data.get("old_vocab_size") if isinstance(data, dict) else None
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise CptronError(f"{path}: old_vocab_size={n!r} is invalid: expected a positive integer")
    return n


def resolve_trainable(cfg: OptimizerConfig, model_cfg: ModelConfig, init_from: Optional[str] = None) -> TrainablePlan:
    """The plan for `cfg` on the model `model_cfg` describes; ConfigError naming the field for a
    pattern that matches no parameter (or only frozen ones, in a group), an unknown first new
    row, or a model left with nothing to train."""
    shapes = model_param_shapes(model_cfg)
    names = list(shapes)
    frozen: set[str] = set()
    for i, pattern in enumerate(cfg.frozen):
        frozen.update(_matching(names, pattern, f"optim.frozen[{i}]", model_cfg))
    rows = None
    # New rows of a factorized embedding are new coordinates in a basis every token shares: masking
    # rows of P alone is not "old rows unchanged" once B trains. optim.frozen works by name instead.
    if cfg.train_new_rows_only and model_cfg.embedding_rank is not None:
        raise invalid(
            "optim.train_new_rows_only",
            True,
            f"false with model.embedding_rank={model_cfg.embedding_rank} (freeze factors by name with optim.frozen, "
            "e.g. tok_embeddings.basis.weight)",
        )
    if cfg.train_new_rows_only:
        start = cfg.new_rows_from
        field = "optim.new_rows_from"
        if start == 0:
            if not init_from:
                raise invalid(
                    field,
                    0,
                    "the first new token id with optim.train_new_rows_only, or checkpoint.init_from "
                    f"a directory holding {VOCAB_EXTENSION_FILE}",
                )
            start, field = read_old_vocab_size(init_from), f"old_vocab_size in {Path(init_from) / VOCAB_EXTENSION_FILE}"
        if not 0 < start < model_cfg.vocab_size:
            raise invalid(field, start, f"a token id in [1, {model_cfg.vocab_size}) (the model's vocab_size)")
        rows = (start, model_cfg.vocab_size)
        frozen.update(n for n in names if n not in ROW_PARAMS)
    if len(frozen) == len(names):
        what = "optim.frozen" if cfg.frozen else "optim.train_new_rows_only"
        value = cfg.frozen if cfg.frozen else True
        raise invalid(what, value, "settings that leave at least one parameter to train, but every one is frozen")
    group_of: dict[str, int] = {}
    for i, group in enumerate(cfg.param_groups):
        for pattern in group.patterns:
            matched = _matching(names, pattern, f"optim.param_groups[{i}].patterns", model_cfg)
            trainable = [n for n in matched if n not in frozen]
            if not trainable:
                raise invalid(
                    f"optim.param_groups[{i}].patterns",
                    pattern,
                    f"a pattern matching a trainable parameter, but all it matches is frozen ({matched[0]}, ...)",
                )
            for n in trainable:
                group_of.setdefault(n, i)  # the first group that matches wins
    rules = {}
    for n in names:
        if n in frozen:
            continue
        group = cfg.param_groups[group_of[n]] if n in group_of else None
        wd = group.weight_decay if group is not None and group.weight_decay is not None else None
        if wd is None:
            wd = cfg.weight_decay if len(shapes[n]) >= 2 else 0.0
        rules[n] = ParamRule(
            lr_scale=group.lr_scale if group is not None else 1.0,
            weight_decay=wd,
            group=group_of.get(n),
            rows=rows if rows is not None and n in ROW_PARAMS else None,
        )
    return TrainablePlan(cfg, shapes, frozenset(frozen), rules, rows, model_cfg.tie_embeddings)


def _matching(names: list[str], pattern: str, field: str, model_cfg: ModelConfig) -> list[str]:
    matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    if not matched:
        tied = " (the head is tied: its weight is tok_embeddings.weight)" if model_cfg.tie_embeddings else ""
        raise invalid(
            field,
            pattern,
            f"a pattern matching a parameter name of the model{tied}, such as {', '.join(names[:2])}, "
            f"layers.*.attention.*, {names[-1]}",
        )
    return matched


class TrainablePlan:
    """The resolved trainable set of a run (see the module doc); the same on every rank."""

    def __init__(
        self,
        cfg: OptimizerConfig,
        shapes: dict[str, tuple[int, ...]],
        frozen: frozenset[str],
        rules: dict[str, ParamRule],
        rows: Optional[tuple[int, int]],
        tied: bool,
    ):
        self.cfg, self.shapes, self.frozen, self.rules, self.rows, self.tied = cfg, shapes, frozen, rules, rows, tied

    def name_of(self, name: str) -> str:
        """The checkpoint name of a part's parameter `name` (wrappers stripped, tied copy renamed)."""
        name = canonical_param_name(name)
        return _TIED_NAME if self.tied and name == _TIED_COPY else name

    def _named(self, part: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        for name, p in part.named_parameters():
            name = self.name_of(name)
            if name not in self.shapes:
                raise CptronError(f"model parameter {name} is not a parameter of the model config: cannot place it")
            yield name, p

    @property
    def masks_rows(self) -> bool:
        return self.rows is not None

    def freeze(self, part: nn.Module) -> None:
        """requires_grad=False on the part's frozen parameters: before TP/FSDP2 wrap the part, which
        carry the flag into their DTensor parameters (FSDP2 then reduces only the others)."""
        for name, p in self._named(part):
            if name in self.frozen:
                p.requires_grad_(False)

    def optimizer_groups(self, part: nn.Module) -> list[dict[str, Any]]:
        """AdamW param groups of the part's trainable parameters: one per (lr_scale, weight decay,
        masked rows), each with its "lr_scale" (read by `apply_lr`); a row-masked group has AdamW
        weight decay 0 and its decay under "row_decay" (applied by `decay_new_rows`)."""
        groups: dict[tuple, dict[str, Any]] = {}
        for name, p in self._named(part):
            if name in self.frozen:
                continue
            rule = self.rules[name]
            key = (rule.lr_scale, rule.weight_decay, rule.rows)
            if key not in groups:
                group: dict[str, Any] = {"params": [], "lr_scale": rule.lr_scale, "weight_decay": rule.weight_decay}
                if rule.rows is not None:
                    group.update(weight_decay=0.0, row_decay=rule.weight_decay, rows=rule.rows)
                groups[key] = group
            groups[key]["params"].append(p)
        return list(groups.values())

    @torch.no_grad()
    def mask_grads(self, parts: Iterable[nn.Module]) -> None:
        """Zero the gradients of the rows that do not train, on each rank's local shard."""
        if self.rows is None:
            return
        for part in parts:
            for name, p in self._named(part):
                if p.grad is not None and self.rules.get(name) is not None and self.rules[name].rows is not None:
                    local, lo, hi = _trained_rows(p.grad, self.rows)
                    local[:lo].zero_()
                    local[hi:].zero_()

    @torch.no_grad()
    def decay_new_rows(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """AdamW's decoupled decay, on the trained rows only, for the parameters AdamW will update."""
        for opt in optimizers:
            for group in opt.param_groups:
                decay = group.get("row_decay", 0.0)
                if not decay:
                    continue
                factor = 1.0 - float(group["lr"]) * decay
                for p in group["params"]:
                    if p.grad is not None:
                        local, lo, hi = _trained_rows(p, group["rows"])
                        local[lo:hi].mul_(factor)

    @torch.no_grad()
    def zero_masked_moments(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Zero AdamW's moments of the rows that do not train (after a resume from a run that trained
        them), so that AdamW's update of those rows is exactly zero."""
        for opt in optimizers:
            for group in opt.param_groups:
                if "rows" not in group:
                    continue
                for p in group["params"]:
                    for key in _MOMENTS:
                        moment = opt.state.get(p, {}).get(key)
                        if isinstance(moment, torch.Tensor) and moment.shape == p.shape:
                            local, lo, hi = _trained_rows(moment, group["rows"])
                            local[:lo].zero_()
                            local[hi:].zero_()

    # -------------------------------------------------------------- reporting and resuming

    def counts(self) -> tuple[int, int]:
        """(trained parameter count, total parameter count) of the full model (trained rows only)."""
        total = trained = 0
        for name, shape in self.shapes.items():
            n = math.prod(shape)
            total += n
            rule = self.rules.get(name)
            if rule is not None:
                trained += n if rule.rows is None else (rule.rows[1] - rule.rows[0]) * math.prod(shape[1:])
        return trained, total

    def describe(self) -> Optional[str]:
        """One line for the start-up log; None when everything trains with the defaults."""
        cfg = self.cfg
        if not (cfg.frozen or cfg.param_groups or self.rows):
            return None
        trained, total = self.counts()
        parts = [f"trainable: {trained:,} of {total:,} parameters"]
        if cfg.frozen:
            parts.append(f"frozen: {', '.join(cfg.frozen)} ({len(self.frozen)} tensors)")
        for g in cfg.param_groups:
            wd = "default" if g.weight_decay is None else f"{g.weight_decay:g}"
            parts.append(f"group {', '.join(g.patterns)}: lr x{g.lr_scale:g} wd {wd}")
        if self.rows is not None:
            parts.append(
                f"new embedding rows only: ids {self.rows[0]}..{self.rows[1] - 1} train, every other parameter "
                "is frozen (old and padding rows masked)"
            )
        return "; ".join(parts)

    def state(self) -> dict[str, Any]:
        """What a checkpoint records of the trainable set (frozen tensors have no optimizer state)."""
        return {"frozen": sorted(self.frozen), "new_rows": list(self.rows) if self.rows else None}

    def check_resume(self, path: Path, load_optimizer: bool) -> None:
        """Collective: refuse, before loading, a resume that would train a parameter the checkpoint
        at `path` holds no optimizer state for (it was frozen then), on every rank alike; freezing
        more, other groups and other new rows work."""
        raise_on_every_rank(self._resume_error(path) if load_optimizer else None, error_type=ConfigError)

    def _resume_error(self, path: Path) -> Optional[str]:
        try:
            saved = json.loads((Path(path) / ckpt.META_FILE).read_text())["train_state"].get("trainable")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None  # the checkpointer's load names what is wrong with the file
        if not isinstance(saved, dict):
            return None
        thawed = sorted(set(saved.get("frozen") or ()) - self.frozen)
        if not thawed:
            return None
        setting = "optim.train_new_rows_only" if saved.get("new_rows") else "optim.frozen"
        return (
            f"{setting} is invalid for this resume: checkpoint {path} was written with {thawed[0]} "
            f"({len(thawed)} tensors) frozen, so without optimizer state, and they would train now; resume "
            "with the same frozen set, or set checkpoint.load_optimizer=false to start AdamW fresh"
        )


def _trained_rows(tensor: torch.Tensor, rows: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
    """(this rank's local tensor, [lo, hi) of its rows that train): global rows [start, stop)
    mapped onto the rows of the global tensor the local shard holds."""
    local, region = local_shard_region(tensor)
    first, n = region[0].start, region[0].stop - region[0].start
    lo = min(max(rows[0] - first, 0), n)
    hi = min(max(rows[1] - first, 0), n)
    return local, lo, hi
