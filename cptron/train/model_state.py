"""The checkpoint view of this rank's model parts and their optimizers.

Owns how parameters and AdamW state map onto checkpoint keys: names of the unwrapped model
(`torch.distributed.checkpoint.state_dict` removes the activation-checkpoint, compile and FSDP
wrappers), a tied output weight stored once under `tok_embeddings.weight` (optimizer state too),
entries merged over the parts of a rank (a rank holding both the first and the last pipeline
stage has the tied embedding twice), and putting loaded values back into the parts.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from cptron.checkpoint import MODEL_PREFIX
from cptron.distributed import get_rank
from cptron.errors import CheckpointError

OPTIMIZER_PREFIX = "optimizer."
PADDED = ("tok_embeddings.weight", "output.weight", "tok_embeddings.coordinates.weight", "output.coordinates.weight")
"""Parameters whose rows are the padded vocabulary."""
_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)
_TIED_ALIAS, _TIED_CANONICAL = "output.weight", "tok_embeddings.weight"
# A tied factorized head (cptron.models.factorized) shares both factors; stored once each, too (pp=1 only).
_TIED_FACTORS = {f"output.{h}.weight": f"tok_embeddings.{h}.weight" for h in ("coordinates", "basis")}


class ModelPartsState:
    """This rank's model parts as checkpoint entries whose values alias the parameters (plain or
    DTensor), so loading into them in place and then calling `apply()` updates the model."""

    def __init__(self, parts: list[nn.Module], tied: bool):
        self.parts, self.tied = parts, tied
        self._states = [self._part_state(p) for p in parts]

    def _part_state(self, part: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(every entry of the part's state dict, the entries stored in a checkpoint)."""
        full = get_model_state_dict(part)
        stored = dict(full)
        if self.tied and _TIED_ALIAS in stored:
            stored.setdefault(_TIED_CANONICAL, stored.pop(_TIED_ALIAS))
        for alias, canonical in _TIED_FACTORS.items() if self.tied else ():
            if alias in stored and canonical in stored:
                stored.pop(alias)
        return full, stored

    def stored_per_part(self) -> list[dict[str, torch.Tensor]]:
        """Each part's stored entries (unprefixed parameter names), in part order."""
        return [stored for _, stored in self._states]

    def model_entries(self, copies: Optional[list] = None, prefix: str = MODEL_PREFIX) -> dict[str, torch.Tensor]:
        """The stored entries of every part under `prefix`ed keys (see `merge_entries` for `copies`)."""
        out: dict[str, torch.Tensor] = {}
        for stored in self.stored_per_part():
            merge_entries(out, {prefix + k: v for k, v in stored.items()}, copies)
        return out

    def optimizer_entries(
        self,
        optimizers: list[torch.optim.Optimizer],
        *,
        state_only: bool = False,
        copies: Optional[list] = None,
        prefix: str = OPTIMIZER_PREFIX,
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """(the optimizers' entries under `prefix`ed keys, each part's flat optimizer state dict
        for `set_optimizer_state_dict`). `state_only`: moments and counts, not hyperparameters."""
        if len(self.parts) != len(optimizers):
            raise ValueError(f"{len(self.parts)} model parts but {len(optimizers)} optimizers: expected one each")
        out: dict[str, Any] = {}
        per_part = []
        for part, opt in zip(self.parts, optimizers, strict=True):
            osd = _optimizer_state(part, opt)
            per_part.append(osd)
            entries = {
                prefix + k: v
                for k, v in self._stored_optimizer_keys(part, osd).items()
                if not state_only or k.startswith("state.")
            }
            merge_entries(out, entries, copies)
        return out, per_part

    def _stored_optimizer_keys(self, part: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
        """The optimizer entries under their checkpoint keys (same values): a last pipeline stage's copy
        of a tied output weight is stored as tok_embeddings.weight, as its weight is."""
        if not (
            self.tied and getattr(part, "tok_embeddings", True) is None and getattr(part, "output", None) is not None
        ):
            return state
        out = {}
        for key, value in state.items():
            kind, _, rest = key.partition(".")
            if rest.startswith(_TIED_ALIAS + "."):
                key = f"{kind}.{_TIED_CANONICAL}{rest[len(_TIED_ALIAS) :]}"
            out[key] = value
        return out

    def apply(self, optimizers: Optional[list] = None, optimizer_states: Optional[list] = None) -> None:
        """Put the (loaded) entries back into the parts, and optimizer states into `optimizers`."""
        for part, (full, stored) in zip(self.parts, self._states, strict=True):
            if self.tied and _TIED_ALIAS in full:
                full[_TIED_ALIAS] = stored[_TIED_CANONICAL]
            for alias, canonical in _TIED_FACTORS.items() if self.tied else ():
                if alias in full and canonical in stored:
                    full[alias] = stored[canonical]
            set_model_state_dict(part, full)
        for part, opt, osd in zip(self.parts, optimizers, optimizer_states, strict=True) if optimizer_states else ():
            set_optimizer_state_dict(part, opt, osd, options=_FLAT)


def is_tied_key(key: str) -> bool:
    """True for the tied embedding's weight or optimizer entries, with or without the checkpoint prefix."""
    for prefix in (MODEL_PREFIX, OPTIMIZER_PREFIX):
        key = key[len(prefix) :] if key.startswith(prefix) else key
    return key == _TIED_CANONICAL or any(
        key.startswith(f"{kind}.{_TIED_CANONICAL}.") for kind in ("state", "param_groups")
    )


def merge_entries(target: dict[str, Any], entries: dict[str, Any], copies: Optional[list] = None) -> None:
    """Add `entries` to `target`. A key already there is an error unless it is the tied embedding, which
    a rank holding both the first and the last pipeline stage has twice (equal copies): the first one is
    kept, and (for loading) `copies` receives (second, first) to copy after the first is read."""
    for key, value in entries.items():
        if key not in target:
            target[key] = value
        elif not is_tied_key(key):
            raise CheckpointError(f"model parts of rank {get_rank()} both hold {key}")
        elif copies is not None and isinstance(value, torch.Tensor) and value is not target[key]:
            copies.append((value, target[key]))


@torch.no_grad()
def copy_duplicates(copies: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """After loading: fill each second copy of a tied embedding from the first."""
    for dst, src in copies:
        dst.copy_(src)


def _optimizer_state(part: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The flattened, FQN-keyed optimizer state dict; a fresh optimizer gets its state
    created first (torch does that with a zero-lr step, which needs grads to be None)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grads = [p.grad for p in params]
    fresh = not optimizer.state
    if fresh:
        for p in params:
            p.grad = None
    try:
        state = get_optimizer_state_dict(part, optimizer, options=_FLAT)
    finally:
        if fresh:
            for p, g in zip(params, grads, strict=True):
                p.grad = g
    if fresh:
        # That zero-lr step counted as a step (Adam's bias correction reads the count): reset
        # it, so the live and the saved state equal a fresh optimizer's (zero moments, step 0).
        live = [st["step"] for st in optimizer.state.values() if isinstance(st.get("step"), torch.Tensor)]
        saved = [
            v
            for k, v in state.items()
            if k.startswith("state.") and k.endswith(".step") and isinstance(v, torch.Tensor)
        ]
        for count in live + saved:
            count.zero_()
    return state
