"""The package layout keeps the data flow: no stage imports a later one, and the running node
never imports training or phantom code (nor the packages only they need)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "dmg_node"

# Stages in data-flow order; a module may import its own stage, earlier stages and the base.
BASE = {"errors", "logs", "metrics", "fsutil", "config", "records", "dicomfiles", "watch", "classify.rules", "classify.patterns"}
# storage comes first: the SCP (net) writes into it and the outbox worker (net) reads from it.
ORDER = ["storage", "net", "assemble", "volume", "classify", "segment", "rtstruct", "seg_output", "late_qa", "pipeline",
         "web", "node"]
# Not part of the running node: they may import anything (and nothing above may import them).
OFFLINE = {"training", "phantoms", "demo", "cli", "cli_train", "serving"}  # serving: the Ray Serve side (inference-serve)


def _stage(module: str) -> str:
    if module in BASE or module.split(".")[0] in {"errors", "logs", "metrics", "fsutil", "config", "records", "dicomfiles", "watch"}:
        return "base"
    return module.split(".")[0]


def _imports(path: Path) -> set[str]:
    """Every dmg_node module *path* imports (top level or inside functions), without the prefix."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dmg_node"):
            base = node.module.removeprefix("dmg_node").lstrip(".")
            found |= {f"{base}.{a.name}".strip(".") if not base else base for a in node.names}
            if not base:
                found |= {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("dmg_node.") for a in node.names if a.name.startswith("dmg_node.")}
    return {m for m in found if m}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)


def test_no_stage_imports_a_later_stage() -> None:
    """receive -> spool -> assemble -> volume -> classify -> segment -> rtstruct -> pipeline -> node:
    each module imports only its own stage, earlier ones and the shared base modules."""
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        if not name or _stage(name) in OFFLINE or _stage(name) == "base" and name.split(".")[0] != "config":
            continue
        here = _stage(name)
        rank = ORDER.index(here) if here in ORDER else -1
        for imported in _imports(path):
            there = _stage(imported)
            if there == "base" or there == here or imported == "__version__":
                continue
            if there in OFFLINE or (there in ORDER and ORDER.index(there) > rank):
                wrong.append(f"{name} imports {imported}")
    assert wrong == []


def test_running_node_imports_no_training_code() -> None:
    """Loading everything `serve` runs leaves training, phantoms, nilearn and onnx unimported.

    (opencv, nibabel and tqdm may load: rt-utils, MONAI and pydicom import them themselves.)"""
    code = (
        "import sys, dmg_node.cli, dmg_node.node, dmg_node.segment.infer, dmg_node.segment.registry\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('nilearn', 'onnx')"
        " or m.startswith(('dmg_node.training', 'dmg_node.phantoms', 'dmg_node.demo')))\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_modules_stay_small_or_say_why() -> None:
    """A module over 400 lines says at its top why it is one module."""
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > 400 and "One module because" not in text[:3000]:
            long.append(f"{path.relative_to(PACKAGE)} ({text.count(chr(10))} lines)")
    assert long == []


def test_pure_stages_and_the_scu_keep_their_distance() -> None:
    """assemble, volume, classify and the RTSTRUCT builder import no network or storage module, and
    the SCU (scu, outbox) does not load the SCP or its pynetdicom patches."""
    rules = {
        "assemble": ("net", "storage"), "volume": ("net", "storage"), "classify": ("net", "storage"),
        "rtstruct": ("net", "storage"),
        "net.scu": ("net.scp", "net.reactor", "net.store_rsp", "net.admission"),
        "net.outbox": ("net.scp", "net.reactor", "net.store_rsp", "net.admission"),
    }
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        for owner, banned in rules.items():
            if name == owner or name.startswith(owner + "."):
                wrong += [f"{name} imports {m}" for m in _imports(path) if m.startswith(banned)]
    assert wrong == []


def test_training_command_without_the_train_extra_says_what_to_install(tmp_path: Path) -> None:
    """Without the [train] packages, `dmg-node phantom` exits 1 with one line naming the extra."""
    code = (
        "import sys; sys.modules['nilearn'] = None\n"  # import nilearn -> ModuleNotFoundError
        "from dmg_node.cli import main\n"
        f"sys.exit(main(['phantom', {str(tmp_path / 'out')!r}, '--n', '1']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr
    assert "pip install 'dmg-node[train]'" in out.stderr and "nilearn" in out.stderr
