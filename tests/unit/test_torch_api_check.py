"""cptron.torch_apis: the installed torch passes, a missing API is named, and the list covers every torch import in cptron."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import cptron
from cptron.errors import CptronError
from cptron.torch_apis import OPTIONAL_TORCH_APIS, TORCH_APIS, check_torch_apis, missing_torch_apis, parse_entry

# Plain `import torch.x` of core packages that every torch has; everything else must be listed.
CORE_MODULES = {"torch", "torch.nn", "torch.nn.functional", "torch.distributed"}


def test_installed_torch_has_every_required_api():
    assert check_torch_apis() == len(TORCH_APIS)
    missing = missing_torch_apis()
    assert all(entry in OPTIONAL_TORCH_APIS for entry, _ in missing), missing


def test_missing_module_attribute_and_keyword_are_each_named():
    entries = (
        "torch.nn.functional:scaled_dot_product_attention",
        "torch.no_such_module_xyz:thing",
        "torch.nn.attention.flex_attention:BlockMask.no_such_method",
        "torch.optim:AdamW(fused, no_such_kwarg)",
    )
    missing = dict(missing_torch_apis(entries))
    assert set(missing) == set(entries[1:])
    assert "ModuleNotFoundError" in missing["torch.no_such_module_xyz:thing"]
    assert "BlockMask.no_such_method does not exist" in missing[entries[2]]
    assert missing[entries[3]] == "takes no keyword argument no_such_kwarg"
    with pytest.raises(CptronError) as e:
        check_torch_apis(entries)
    message = str(e.value)
    assert "lacks 3 of the 4 torch APIs" in message
    assert all(entry in message for entry in entries[1:])
    assert "scaled_dot_product_attention" not in message


def test_optional_entries_do_not_fail_the_check(monkeypatch):
    monkeypatch.setattr("cptron.torch_apis.OPTIONAL_TORCH_APIS", frozenset({"torch.no_such_module_xyz"}))
    assert check_torch_apis(("torch.no_such_module_xyz", "torch:compile")) == 2


def test_entry_syntax():
    assert parse_entry("torch.optim:AdamW(fused, foreach)") == ("torch.optim", "AdamW", ("fused", "foreach"))
    assert parse_entry("torch.distributed.checkpoint") == ("torch.distributed.checkpoint", None, ())
    assert parse_entry("torch:compile") == ("torch", "compile", ())
    with pytest.raises(ValueError, match="entry 'torch:compile\\(' is invalid"):
        parse_entry("torch:compile(")


def _torch_imports(path: Path) -> set[str]:
    """Entries ('module:name' or 'module') that the file's torch imports need, in any scope."""
    needed = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("torch."):
            needed.update(f"{node.module}:{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            needed.update(a.name for a in node.names if a.name.startswith("torch.") and a.name not in CORE_MODULES)
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and str(node.args[0].value).startswith("torch.")
        ):
            needed.add(node.args[0].value)
    return needed


def test_every_torch_import_in_cptron_is_listed():
    listed, listed_modules = set(), set()
    for entry in TORCH_APIS:
        module, attr, _ = parse_entry(entry)
        listed_modules.add(module)
        parts = (attr or "").split(".") if attr else []
        # `mod:A.b` covers an import of `mod:A` as well
        listed.update(f"{module}:{'.'.join(parts[:i])}" for i in range(1, len(parts) + 1))
    root = Path(cptron.__file__).parent
    unlisted = {}
    for path in sorted(root.rglob("*.py")):
        for need in _torch_imports(path):
            module_only = ":" not in need
            if need not in listed and not (module_only and need in listed_modules):
                unlisted.setdefault(need, path.relative_to(root.parent).as_posix())
    assert not unlisted, f"add these to cptron.torch_apis.TORCH_APIS: {unlisted}"
    # The scan sees the private imports the shims make inside functions.
    seen = set().union(*(_torch_imports(p) for p in root.rglob("*.py")))
    assert "torch._higher_order_ops.flex_attention:flex_attention" in seen
    assert "torch.distributed.algorithms._checkpoint.checkpoint_wrapper:checkpoint_wrapper" in seen
