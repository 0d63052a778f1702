"""The architecture's rules (docs/DESIGN.md), read from the source: no import cycle inside vitscale,
no private name used across modules, the layers import only downwards, one module reads the
launcher's variables, one module builds the DeepSpeed config."""
import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "vitscale"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PKG.rglob("*.py"):
        name = ".".join(path.relative_to(PKG.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


MODULES = _modules()


def _package(name: str) -> str:
    return name if MODULES[name].name == "__init__.py" else name.rsplit(".", 1)[0]


def _imports(name: str) -> list[tuple[str, str | None]]:
    """(module, imported name or None) for every import of ``name``, wherever it sits (functions too)."""
    out = []
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = _package(name).split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            out += [(base, a.name) for a in node.names]
    return out


def _targets(name: str) -> set[str]:
    """The vitscale modules ``name`` imports (``from pkg import module`` counts as the module)."""
    found = set()
    for module, imported in _imports(name):
        if imported and f"{module}.{imported}" in MODULES:
            found.add(f"{module}.{imported}")
        elif module in MODULES:
            found.add(module)
    return found - {name}


GRAPH = {name: _targets(name) for name in MODULES}


def _cycle() -> list[str] | None:
    """An import cycle between modules, package ``__init__`` re-exports left out (as Python runs them)."""
    done, stack = set(), []

    def visit(m):
        if m in stack:
            return stack[stack.index(m):] + [m]
        if m in done:
            return None
        stack.append(m)
        for n in sorted(GRAPH[m]):
            if MODULES[n].name != "__init__.py" and (found := visit(n)):
                return found
        stack.pop()
        done.add(m)
        return None

    for m in sorted(GRAPH):
        if found := visit(m):
            return found
    return None


def test_no_import_cycle():
    assert _cycle() is None, " -> ".join(_cycle())


def test_the_cycle_finder_finds_a_planted_cycle(monkeypatch):
    # checkpoint <-> export imported each other before the architecture issue: plant that back
    monkeypatch.setitem(GRAPH, "vitscale.train.checkpoint", GRAPH["vitscale.train.checkpoint"] | {"vitscale.train.export"})
    assert _cycle() == ["vitscale.train.checkpoint", "vitscale.train.export", "vitscale.train.checkpoint"]


def _private_uses(name: str) -> list[str]:
    """Private names (one leading underscore) of another vitscale module that ``name`` uses."""
    tree = ast.parse(MODULES[name].read_text())
    found = [f"{module}.{imported}" for module, imported in _imports(name)
             if module.startswith("vitscale") and imported and re.match(r"_[^_]", imported)
             and module != name]
    aliases = {}  # local name -> vitscale module, for `import vitscale.x as y` / `from vitscale import x`
    for module, imported in _imports(name):
        key = f"{module}.{imported}" if imported else module
        if key in MODULES:
            aliases[(imported or module).split(".")[-1]] = key
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and re.match(r"_[^_]", node.attr) and aliases[node.value.id] != name):
            found.append(f"{aliases[node.value.id]}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names():
    offenders = {name: uses for name in MODULES if (uses := _private_uses(name))}
    assert not offenders, offenders


@pytest.mark.parametrize("layer, allowed", [
    # the bottom layer: nothing of vitscale but itself and the leaf helpers
    ("vitscale.config", ("vitscale.config", "vitscale.files")),
    # models know nothing of training or data
    ("vitscale.models", ("vitscale.models", "vitscale.config", "vitscale.registry", "vitscale.distributed")),
    # data knows nothing of models or training
    ("vitscale.data", ("vitscale.data", "vitscale.config", "vitscale.registry", "vitscale.files", "vitscale")),
])
def test_layers_import_only_downwards(layer, allowed):
    for name, targets in GRAPH.items():
        if name == layer or name.startswith(layer + "."):
            wrong = sorted(t for t in targets if not any(t == a or t.startswith(a + ".") for a in allowed)
                           and t != "vitscale")
            assert not wrong, f"{name} imports {wrong}"


def _code_strings(path: Path) -> set[str]:
    """The string constants of a module's code (docstrings left out)."""
    tree = ast.parse(path.read_text())
    docs = {id(body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and (body := node.body) and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)}
    return {node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs}


def test_only_distributed_reads_launcher_variables():
    launcher_var = re.compile(r"RANK|WORLD_SIZE|LOCAL_RANK|LOCAL_WORLD_SIZE|MASTER_ADDR|MASTER_PORT|SLURM_\w+|OMPI_\w+"
                              r"|PMIX?_\w+|MPI_LOCAL\w+")
    assert {"RANK", "SLURM_PROCID"} <= {s for s in _code_strings(MODULES["vitscale.distributed"])
                                         if launcher_var.fullmatch(s)}  # the check sees what it looks for
    # rehearsal/launchers.py is itself a launcher (vitscale-rehearse): it sets them for the job, reads none
    for name, path in MODULES.items():
        if name not in ("vitscale.distributed", "vitscale.rehearsal.launchers"):
            named = sorted(s for s in _code_strings(path) if launcher_var.fullmatch(s))
            assert not named, f"{name} reads launcher variables {named}; only vitscale.distributed may"


def test_only_the_composer_builds_a_deepspeed_config():
    for name, path in MODULES.items():
        if name != "vitscale.config.deepspeed":
            text = path.read_text()
            assert "zero_optimization" not in text and "train_micro_batch_size_per_gpu" not in text, name
