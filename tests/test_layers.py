"""The package's layers point one way: kvm <- arch <- devices <- the machine
core <- migration and CPR <- monitor <- the process <- the command line.

Every import between minivmm modules is read from the source, imports
inside functions included (they are still dependencies, only later ones).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "minivmm"

# Lowest first; a module may import its own layer or lower ones, never higher.
LAYERS = (
    # Building blocks with no policy; guest RAM is one (the boot loaders in arch write into it).
    # The VFIO and iommufd bindings sit beside KVM's.
    ("support", ("minivmm", "minivmm.kvm", "minivmm.vfio", "minivmm.vmstate", "minivmm.memory", "minivmm.log",
                 "minivmm.options", "minivmm.files", "minivmm.sockets", "minivmm.runstate", "minivmm.guests",
                 "minivmm.mainloop")),
    ("arch", ("minivmm.arch",)),
    # vfio-user: a device model served over a socket, its protocol, server and client.
    ("devices", ("minivmm.devices", "minivmm.vfio_user")),
    ("core", ("minivmm.config", "minivmm.chardev", "minivmm.vcpu", "minivmm.machine",
              "minivmm.cpr.fdtable")),
    ("migration and CPR", ("minivmm.migration", "minivmm.cpr")),
    ("monitor", ("minivmm.monitor",)),
    ("process", ("minivmm.process",)),
    ("command line", ("minivmm.cli", "minivmm.demo", "minivmm.vmprocess")),
    ("entry point", ("minivmm.__main__",)),
)  # fmt: skip


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _resolve(module: str, node: ast.AST) -> set[str]:
    """The minivmm modules an import statement names (``from x import y`` may name module x.y)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".")
            if MODULES[module].name != "__init__.py":
                package = package[:-1]
            package = package[: len(package) - node.level + 1]
            base = ".".join(package + ([base] if base else []))
        names = [base] + [f"{base}.{a.name}" for a in node.names]
    found = set()
    for name in names:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name.startswith("minivmm"):
            found.add(name)
    return found


def _imports() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                deps |= _resolve(module, node)
        # A package's own __init__ runs first anyway: importing it is not a dependency.
        graph[module] = {d for d in deps if d != module and not module.startswith(d + ".")}
    return graph


def _rank(module: str) -> tuple[int, str]:
    best = None
    for rank, (name, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            inside = module == prefix or module.startswith(prefix + ".")
            if inside and (best is None or len(prefix) > best[2]):
                best = (rank, name, len(prefix))
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best[0], best[1]


def test_every_module_is_in_a_layer_and_imports_only_downwards():
    graph = _imports()
    upward = []
    for module, deps in graph.items():
        rank, layer = _rank(module)
        for dep in deps:
            dep_rank, dep_layer = _rank(dep)
            if dep_rank > rank:
                upward.append(f"{module} ({layer}) imports {dep} ({dep_layer})")
    assert not upward, "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = _imports()
    state: dict[str, int] = {}  # 1: on the path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(path[path.index(dep) :] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


def test_kvm_bindings_import_nothing_else_and_only_main_imports_the_command_line():
    graph = _imports()
    for module, deps in graph.items():
        if module.startswith("minivmm.kvm"):
            assert all(d.startswith("minivmm.kvm") for d in deps), (module, deps)
        if "minivmm.cli" in deps:
            assert module == "minivmm.__main__", f"{module} imports the command line"
    assert graph["minivmm.cpr"] == set(), "the cpr package's __init__ must stay empty: the core imports cpr.fdtable"


def test_the_checker_sees_an_upward_import_and_a_cycle(tmp_path, monkeypatch):
    """The checks above can fail: a made-up module that imports upwards, and two that import each other."""
    fake = {
        "minivmm.devices.bad": "from minivmm.monitor import commands\n",
        "minivmm.machine.a": "from . import b\n",
        "minivmm.machine.b": "from . import a\n",
    }
    for name, text in fake.items():
        path = tmp_path / (name.rpartition(".")[2] + ".py")
        path.write_text(text)
        monkeypatch.setitem(MODULES, name, path)
    graph = _imports()
    assert "minivmm.monitor.commands" in graph["minivmm.devices.bad"]
    assert _rank("minivmm.devices.bad")[0] < _rank("minivmm.monitor.commands")[0]
    assert graph["minivmm.machine.a"] == {"minivmm.machine.b"} and graph["minivmm.machine.b"] == {"minivmm.machine.a"}
