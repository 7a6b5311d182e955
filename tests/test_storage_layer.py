"""deepalign/storage is the bottom layer (atomic writes, JSONL stores, digests, redaction): it imports nothing
else from deepalign, and deepalign/rundir.py keeps the run dir only."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STORAGE = ROOT / "deepalign" / "storage"
MOVED = {
    "write_text_atomic", "write_json_atomic", "_UMASK",  # storage/atomic.py
    "secret_values", "redact", "RedactingFilter", "redact_logs", "scrub_file", "scrub_files", "scrub_run_dir",
    "REDACTED", "SECRET_ENV", "SECRET_KEY", "SECRET_ASSIGNMENT", "URL_USERINFO",  # storage/redaction.py
    "JsonlStore",  # storage/jsonl.py
    "_stamp", "_sha256", "DigestCache", "file_digest", "folder_digest",  # storage/digests.py
}  # fmt: skip


def _deepalign_imports(source: str, package: list[str]) -> list[tuple[int, str]]:
    """(line, module) of every import of `deepalign` or a module under it in `source`, a module of `package`
    (["deepalign", "storage"]); relative imports resolved, one that climbs above the top package as ".."."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level > len(package):
                found.append((node.lineno, ".."))
                continue
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            # `from deepalign import x` (or `from .. import x` here) may import the module deepalign.x
            names = [f"{module}.{alias.name}" for alias in node.names]
            modules = names if module == "deepalign" else [module]
        else:
            continue
        found += [(node.lineno, m) for m in modules if m == "deepalign" or m.startswith("deepalign.")]
    return found


def test_storage_imports_nothing_else_from_deepalign():
    files = sorted(STORAGE.rglob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "atomic.py", "jsonl.py", "digests.py", "redaction.py"}
    wrong = []
    for path in files:
        package = ["deepalign", *path.parent.relative_to(ROOT / "deepalign").parts]
        for line, module in _deepalign_imports(path.read_text(), package):
            if module != "deepalign.storage" and not module.startswith("deepalign.storage."):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not wrong, f"deepalign/storage must import nothing else from deepalign: {wrong}"


def test_rundir_keeps_the_run_dir_only():
    tree = ast.parse((ROOT / "deepalign" / "rundir.py").read_text())
    defined = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Assign):
            defined.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            defined.add(node.target.id)
    assert {"MetricsFile", "RunDirError", "lock_run_dir", "read_stage_state", "environment_record"} <= defined
    assert not defined & MOVED, f"deepalign/rundir.py defines what deepalign/storage holds: {defined & MOVED}"
