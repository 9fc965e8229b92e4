"""The package stays formatted and lint-clean under the repository's ruff.toml, and within the size
and import rules of the architecture notes (files under 600 lines)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_ruff_check_finds_nothing_in_the_package():
    out = _ruff("check", "--no-cache", "cptron")
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_package_is_ruff_formatted():
    out = _ruff("format", "--check", "--no-cache", "cptron")
    assert out.returncode == 0, "run `ruff format cptron`:\n" + out.stdout + out.stderr


def test_no_package_file_reaches_600_lines():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "cptron").rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) >= 600}
    assert not long, f"split these by job: {long}"
