"""http/ has no __init__.py, so the standard library's http wins from the repo root."""

import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()


def test_repo_http_folder_is_not_a_package():
    assert (REPO / "http").is_dir()
    assert not (REPO / "http" / "__init__.py").exists()


def test_python_from_repo_root_imports_the_standard_library_http():
    out = subprocess.run([sys.executable, "-c", "import http, falcon, waitress; print(http.__file__)"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(out).resolve().is_relative_to(STDLIB), out


def test_pytest_process_uses_the_standard_library_http():
    import http
    assert Path(http.__file__).resolve().is_relative_to(STDLIB)


def test_the_app_still_imports_through_the_package_mapping():
    out = subprocess.run([sys.executable, "-c", "import gpu_orchestrator.http.app as a; print(a.__file__)"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(out).resolve() == (REPO / "http" / "app.py").resolve() or out.endswith("gpu_orchestrator/http/app.py")


# ---- the floors: what may import what --------------------------------------------------------

PACKAGES = {"supervisor": "gpu_orchestrator.supervisor", "loaders": "gpu_orchestrator.loaders",
            "http": "gpu_orchestrator.http"}
MAX_LINES = 400  # a production file a newcomer can read at once


def module_name(path: Path) -> str:
    folder, *rest = path.relative_to(REPO).with_suffix("").parts
    return ".".join([PACKAGES[folder], *rest]).removesuffix(".__init__")


def production_files() -> list[Path]:
    return sorted(p for folder in PACKAGES for p in (REPO / folder).rglob("*.py"))


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Every project module `path` imports, at any depth in the file (lazy imports count too)."""
    import ast
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        found.update(name for name in names if name in modules)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in production_files()}
    return {name: imports_of(path, set(modules)) - {name} for name, path in modules.items()}


def floor(module: str) -> str:
    return "commands" if ".commands" in module else module.split(".")[1]


def test_no_module_imports_itself_through_others():
    graph, cycles = import_graph(), []
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for imported in sorted(graph[module]):
            if state.get(imported) == 1:
                cycles.append(" -> ".join(path[path.index(imported):] + [imported]))
            elif imported not in state:
                visit(imported, [*path, imported])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


# Each floor imports only the floors below it: loaders (the loader process and the wire format,
# channel, states and logs both sides share) at the bottom, then http (which reads answers, never
# the supervisor's internals), then the daemon, then the commands on top.
ALLOWED = {"loaders": {"loaders"}, "http": {"http", "loaders"}, "supervisor": {"supervisor", "http", "loaders"},
           "commands": {"commands", "supervisor", "http", "loaders"}}


def test_every_import_goes_down_the_floors():
    wrong = [f"{module} imports {imported}" for module, imported_set in import_graph().items()
             for imported in sorted(imported_set) if floor(imported) not in ALLOWED[floor(module)]]
    assert wrong == []


def test_no_production_file_is_longer_than_a_newcomer_can_read():
    lines = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in production_files()}
    long = {name: count for name, count in lines.items() if count > MAX_LINES}
    assert long == {}


def test_the_repo_explains_itself_without_pointing_outside_it():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    # Spelled in two halves, so that this file does not itself hold what it looks for.
    outside = (b"DESIGN" + b".md", b"../" + b"shared")
    pointing = [name for name in tracked
                if (REPO / name).is_file() and any(s in (REPO / name).read_bytes() for s in outside)]
    assert pointing == []
