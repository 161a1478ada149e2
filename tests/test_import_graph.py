"""The package's import graph shows its layers: no cycles, no import upward, and no torch for --help or plugins."""

import ast
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

PACKAGE = ROOT / "videotuna_dpo"
# Library layers below the verbs: they never import a pipeline step, the CLI or the review tool.
VERBS = ("videotuna_dpo.pipeline", "videotuna_dpo.cli", "videotuna_dpo.review")
# Programs on top of the CLI (`python -m videotuna_dpo`, `python -m videotuna_dpo.toy.ablation`,
# `python -m videotuna_dpo.toy.rounds`), not library modules.
PROGRAMS = ("videotuna_dpo.__main__", "videotuna_dpo.toy.ablation", "videotuna_dpo.toy.rounds")


def _modules() -> dict[str, ast.Module]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        found[name] = ast.parse(path.read_text())
    return found


def _imports(tree: ast.Module, modules: dict) -> set[str]:
    """The package's modules ``tree`` imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom) and node.module else []
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name.startswith("videotuna_dpo"):
                out.add(name)
    return out


def test_the_import_graph_has_no_cycle():
    modules = _modules()
    graph = {name: _imports(tree, modules) - {name} for name, tree in modules.items()}
    done, path = set(), []

    def visit(name):
        if name in path:
            pytest.fail(f"import cycle: {' -> '.join(path[path.index(name):] + [name])}")
        if name in done:
            return
        path.append(name)
        for other in sorted(graph[name]):
            visit(other)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def test_library_layers_never_import_the_verbs():
    modules = _modules()
    upward = {name: sorted(m for m in _imports(tree, modules) if m.startswith(VERBS))
              for name, tree in modules.items() if not name.startswith(VERBS) and name not in PROGRAMS}
    assert {name: found for name, found in upward.items() if found} == {}


@pytest.mark.parametrize("argv", [["--help"], ["plugins"], ["train", "--help"], ["generate", "--help"],
                                  ["score", "--help"], ["pairs", "--help"], ["review", "--help"], ["cache", "--help"],
                                  ["eval", "--help"], ["demo", "--help"]])
def test_help_and_plugins_import_no_torch(argv):
    code = ("import contextlib, io, json, sys\n"
            "from videotuna_dpo.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n"
            f"        main({argv!r})\n"
            "    except SystemExit:\n"
            "        pass\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lightning'))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []
