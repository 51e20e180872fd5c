"""Imports flow one way: root scripts -> procedures -> networks/dataset -> utils."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROOT_SCRIPTS = {"train", "protect", "tamper", "evaluate", "GUI", "bench", "config"}
LOWER = {"utils": ROOT_SCRIPTS | {"procedures", "generator", "discriminator", "scanDataset"},
         "procedures": ROOT_SCRIPTS - {"config"}}


def _imports(path: Path) -> set[str]:
    """Top-level names of every import in the file, function-level (lazy) imports included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_procedures_and_utils_never_import_upwards():
    wrong = {}
    for layer, forbidden in LOWER.items():
        for path in (ROOT / layer).rglob("*.py"):
            bad = _imports(path) & forbidden
            if bad:
                wrong[str(path.relative_to(ROOT))] = sorted(bad)
    assert not wrong
