"""The repository's layout: docs/kernels.md's file map matches the tree, no import cycles, no outside references.

One op, one place (docs/design.md, section 1): every file of an op is listed in
the map, every listed file exists, and a backend marked "-" has no file.
"""
import ast
import re
from pathlib import Path

import fastctx.ops

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["op", "public op", "reference", "triton", "cpu", "cuda host", "cuda device", "cuda launch plan", "tests"]
# Where each column's file lives, as a pattern of the op name.
PATTERNS = {
    "public op": "fastctx/ops/{op}.py", "reference": "fastctx/reference/{op}.py", "triton": "kernels/{op}.py",
    "cpu": "csrc/cpu/{op}.cpp", "cuda host": "csrc/cuda/{op}.cu", "cuda device": "csrc/cuda/{op}_kernel.cuh",
    "cuda launch plan": "csrc/cuda/{op}_launch.h", "tests": "tests/ops/test_{op}.py",
}


def file_map() -> dict[str, dict[str, str]]:
    text = (ROOT / "docs" / "kernels.md").read_text()
    block = re.search(r"<!-- file-map -->\n(.*?)<!-- /file-map -->", text, re.S)
    assert block, "docs/kernels.md has no <!-- file-map --> table"
    rows = [line for line in block.group(1).splitlines() if line.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    assert header == COLUMNS, header
    table = {}
    for line in rows[2:]:
        cells = [c.strip().strip("`") for c in line.strip("|").split("|")]
        table[cells[0]] = dict(zip(COLUMNS[1:], cells[1:]))
    return table


def test_file_map_lists_every_op_and_matches_the_tree():
    table = file_map()
    # an op living in another op's files (FusedOp.home) is listed under that op
    assert set(table) == {op.home for op in fastctx.ops.OPS.values()}, "ops in the map vs ops registered"
    for op, files in table.items():
        for column, path in files.items():
            expected = PATTERNS[column].format(op=op)
            if path == "-":
                assert not (ROOT / expected).exists(), f"{expected} exists but the map says {op} has no {column}"
            else:
                assert path == expected, f"{op} {column}: the map says {path}, the layout is {expected}"
                assert (ROOT / path).is_file(), f"{path} (listed for {op}) does not exist"


def test_every_op_file_in_the_tree_is_in_the_map():
    listed = {path for files in file_map().values() for path in files.values()}
    # shared files and module-level oracles are named in the text around the map
    listed |= set(re.findall(r"`([\w/]+\.\w+)`", (ROOT / "docs" / "kernels.md").read_text()))
    for pattern in PATTERNS.values():
        directory, name = pattern.rsplit("/", 1)
        regex = re.compile("^" + re.escape(name).replace(re.escape("{op}"), r"(?!_)\w+?") + "$")
        for path in (ROOT / directory).iterdir():
            rel = f"{directory}/{path.name}"
            if regex.match(path.name) and not path.name.startswith("_") and rel not in listed:
                # shared files of the layout are named without an op
                assert path.name in {"__init__.py", "module.cpp"}, f"{rel} is not in docs/kernels.md's file map"


def _module_graph(package_dirs: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> modules it imports at import time (top-level statements), within the given packages."""
    modules = {}
    for package, directory in package_dirs.items():
        for path in directory.rglob("*.py"):
            rel = path.relative_to(directory).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            modules[".".join([package, *parts])] = (path, path.name == "__init__.py")
    graph = {}
    for name, (path, is_package) in modules.items():
        base = name if is_package else name.rsplit(".", 1)[0]
        edges = set()
        for node in ast.parse(path.read_text()).body:  # top level only: lazy imports in functions are fine
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    anchor = base.split(".")[: len(base.split(".")) - node.level + 1]
                    target = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    target = node.module
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    edges.add(sub if sub in modules else target)
            elif isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def test_no_import_cycles():
    graph = _module_graph({"fastctx": ROOT / "fastctx", "fastctx.kernels": ROOT / "kernels"})
    # A package's __init__ importing its own submodules is how packages export; cycles through a
    # package __init__ that re-exports are not the kind that breaks imports. Check modules only.
    packages = {n for n in graph if (ROOT / "fastctx" / Path(*n.split(".")[1:]) / "__init__.py").exists()
                or n == "fastctx.kernels"}
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node] - packages):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(set(graph) - packages):
        if node not in state:
            visit(node)


def test_nothing_refers_outside_the_repository():
    pattern = re.compile(r"\.\./shared|shared/|\bDESIGN\b")
    offenders = []
    for path in ROOT.rglob("*"):
        if any(part in {".git", "build", "work_dirs", "__pycache__"} or part.endswith(".egg-info")
               for part in path.relative_to(ROOT).parts):
            continue
        if path == Path(__file__):
            continue
        if path.is_file() and path.suffix in {".py", ".md", ".cpp", ".cu", ".cuh", ".h", ".yaml", ".toml", ".txt"}:
            if pattern.search(path.read_text(errors="ignore")):
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"files referring to a design document outside the repository: {offenders}"
