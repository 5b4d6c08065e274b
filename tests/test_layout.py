"""The package's layers, read from its imports: no import runs up a layer, no circle, the
domain imports no pytest, and the shipped suites import only the public surface.

The layers, lowest first (README, "How the code is organised"):
core -> arch -> kernel -> machine -> lab -> trace -> report -> the faces (plugin, cli).
The package's __init__ is the public surface over all of them (it imports on first use).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import pytest_syscall_irl

PACKAGE = Path(pytest_syscall_irl.__file__).resolve().parent
ROOT = PACKAGE.parent
NAME = "pytest_syscall_irl"
LAYERS = {"core": 0, "arch": 1, "kernel": 2, "machine": 3, "lab": 4, "trace": 5, "report": 6, "plugin": 7, "cli": 7}
# Where pytest may be imported: the pytest face only.
PYTEST_LAYERS = {"plugin"}
# Everything that knows x86 lives in arch/x86_64; the other layers know roads, ABIs and
# register files as descriptions, handed to them by the faces (which choose the architecture).
ARCH_CHOOSERS = {"plugin", "cli"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[1:2] in (("suites",), ("guest_sources",)):
            continue
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every module of the package *name* imports, anywhere in it (TYPE_CHECKING and
    function-level imports too: a circle through them is still a circle to a reader)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{alias.name}" for alias in node.names] + [module]
        else:
            continue
        for target in targets:
            # The longest module name the target starts with (a name imported from a module is not one).
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_module_lives_in_a_layer() -> None:
    loose = [name for name in MODULES if name != NAME and _layer(name) not in LAYERS]
    assert not loose, f"modules outside the layers {sorted(LAYERS)}: {loose}"


def test_no_import_runs_up_a_layer() -> None:
    upward = [f"{name} -> {target}" for name, targets in GRAPH.items() if name != NAME for target in targets
              if target != NAME and LAYERS[_layer(target) or ""] > LAYERS[_layer(name) or ""]]
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(sorted(upward))


def test_only_the_public_surface_imports_the_package_top() -> None:
    # The top imports everything (lazily): a module importing it would import up.
    inward = [name for name, targets in GRAPH.items() if name != NAME and NAME in targets]
    assert not inward, f"modules importing the package's public surface from inside: {inward}"


def test_the_imports_draw_no_circle() -> None:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in GRAPH.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for name in GRAPH:
        if name != NAME and name not in index:
            visit(name)
    assert not circles, f"import circles: {circles}"


def test_only_the_pytest_face_imports_pytest() -> None:
    def imports_pytest(path: Path) -> bool:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "pytest" for a in node.names):
                return True
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "pytest":
                return True
        return False

    offenders = [name for name, path in MODULES.items() if _layer(name) not in PYTEST_LAYERS and imports_pytest(path)]
    assert not offenders, f"domain modules importing pytest: {offenders}"


def test_architecture_specific_code_stays_in_its_folder() -> None:
    reaching = [f"{name} -> {target}" for name, targets in GRAPH.items()
                if name != NAME and not name.startswith(f"{NAME}.arch.") and _layer(name) not in ARCH_CHOOSERS
                for target in targets if target.startswith(f"{NAME}.arch.x86_64")]
    # arch/registry.py names the architectures by a string it imports on demand; the other
    # neutral modules never name one.
    generic = [f"{name} -> {target}" for name, targets in GRAPH.items()
               if name.startswith(f"{NAME}.arch.") and not name.startswith(f"{NAME}.arch.x86_64")
               for target in targets if target.startswith(f"{NAME}.arch.x86_64")]
    asking = [name for name, targets in GRAPH.items()
              if f"{NAME}.arch.registry" in targets and _layer(name) not in ARCH_CHOOSERS]
    assert not generic, "the architecture-neutral arch modules import x86_64:\n" + "\n".join(generic)
    assert not asking, f"only the faces choose the architecture (arch.registry): {asking}"
    assert not reaching, ("layers other than the faces reach into arch/x86_64 (hand them the architecture's "
                          "description instead):\n" + "\n".join(sorted(reaching)))


@pytest.mark.parametrize("suite", [ROOT / "test_suites", ROOT / "tests" / "user_suite"], ids=["shipped", "user"])
def test_suites_import_only_the_public_surface(suite: Path) -> None:
    deep = []
    for path in sorted(suite.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(NAME + "."):
                deep.append(f"{path.relative_to(ROOT)}: from {node.module} import ...")
            if isinstance(node, ast.Import) and any(a.name.startswith(NAME + ".") for a in node.names):
                deep.append(f"{path.relative_to(ROOT)}: import {', '.join(a.name for a in node.names)}")
    assert not deep, "suites import past the public surface (`from pytest_syscall_irl import NAME`):\n" + \
        "\n".join(deep)


def test_the_public_names_resolve() -> None:
    missing = []
    for name in pytest_syscall_irl.__all__:
        try:
            getattr(pytest_syscall_irl, name)
        except (AttributeError, ImportError) as exc:
            missing.append(f"{name}: {exc}")
    assert not missing, missing


def test_the_kernel_s_elf_machine_chooses_the_architecture() -> None:
    from pytest_syscall_irl.arch.registry import architecture_for
    from pytest_syscall_irl.arch.x86_64 import X86_64
    from pytest_syscall_irl.core.errors import ConfigError

    assert architecture_for("EM_X86_64") is X86_64
    with pytest.raises(ConfigError, match=r"built for EM_AARCH64, and pytest-syscall-irl describes only EM_X86_64"):
        architecture_for("EM_AARCH64")
