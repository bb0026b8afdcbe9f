"""The repository root is the package `tritongpt`, and Python puts the working directory first
on sys.path (`python -m pytest`, `python -c`, notebooks). Its folders must then never shadow an
installed distribution of the same name: Hugging Face's `kernels`, which transformers imports,
is the case that broke CI."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("kernels", "model", "train", "bench", "data")


def run_from_root(code: str) -> str:
    """Run `code` in a fresh interpreter whose working directory (sys.path[0]) is the repository root."""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done.stdout


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_subpackage_folders_are_namespace_packages(name):
    # a regular package (with __init__.py) in the working directory beats site-packages; a
    # namespace directory loses to any regular package of the same name on sys.path
    assert (ROOT / name).is_dir()
    assert not (ROOT / name / "__init__.py").exists(), f"{name}/__init__.py would shadow an installed `{name}`"


def test_hugging_face_kernels_is_not_shadowed():
    spec = importlib.util.find_spec("kernels")
    assert spec is not None and spec.origin, "Hugging Face's `kernels` is in the dev extra: pip install -e '.[dev]'"
    installed = Path(spec.origin).resolve()
    assert (ROOT / "kernels") not in installed.parents and "site-packages" in installed.parts
    found = run_from_root("import kernels; print(kernels.__file__)").strip()
    assert Path(found).resolve() == installed


def test_transformers_round_trip_from_root():
    # transformers imports `kernels` when it is installed; then our GPT goes to HF and back
    out = run_from_root(
        "import tempfile, torch, transformers\n"
        "from tritongpt import GPT, GPTConfig\n"
        "from tritongpt.model.hf import load_hf, save_hf\n"
        "torch.manual_seed(0)\n"
        "config = GPTConfig(vocab_size=128, real_vocab_size=100, block_size=16, n_layer=1, n_head=2, n_embd=32,"
        " backend='torch')\n"
        "ours = GPT(config).eval()\n"
        "with tempfile.TemporaryDirectory() as tmp:\n"
        "    theirs = transformers.GPT2LMHeadModel.from_pretrained(save_hf(ours, tmp + '/m')).eval()\n"
        "    back = load_hf(tmp + '/m', backend='torch')\n"
        "idx = torch.randint(0, 100, (1, 8))\n"
        "with torch.no_grad():\n"
        "    a, b, c = ours.logits(ours.hidden_states(idx)), theirs(idx).logits, back.logits(back.hidden_states(idx))\n"
        "print(float((a - b).abs().max() / b.abs().max()), float((c - b).abs().max() / b.abs().max()))\n")
    errors = [float(x) for x in out.split()]
    assert len(errors) == 2 and all(e <= 1e-5 for e in errors), out


def test_public_names_import_lazily_from_the_top_level_package():
    out = run_from_root(
        "import sys, tritongpt\n"
        "print('torch' in sys.modules)\n"
        "from tritongpt import GPT, GPTConfig, flash_attention, layer_norm, gelu_mlp\n"
        "print(all(callable(f) for f in (GPT, GPTConfig, flash_attention, layer_norm, gelu_mlp)))\n")
    assert out.split() == ["False", "True"]


# --- imports: no cycles, and every first-party import inside a function says why -----------------

PACKAGE = "tritongpt"


def package_modules() -> dict[str, Path]:
    """{dotted module name: file} of every module of the package (the repository root), tests excluded."""
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[0] == "tests" or any(part.startswith(".") or part.endswith(".egg-info") for part in parts):
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join((PACKAGE, *parts))] = path
    return modules


def _type_checking_only(tree: ast.Module) -> set[ast.AST]:
    """The import nodes under `if TYPE_CHECKING:`, which never run."""
    return {node for block in ast.walk(tree) if isinstance(block, ast.If) and ast.unparse(block.test) in
            ("TYPE_CHECKING", "typing.TYPE_CHECKING") for stmt in block.body for node in ast.walk(stmt)}


def first_party_imports(path: Path, modules: dict[str, Path]) -> Iterator[tuple[ast.stmt, list[str], bool]]:
    """(import node, the package modules it imports, whether it sits inside a function) for every
    import of the package in `path` that runs (not the ones under `if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text(), str(path))
    skipped = _type_checking_only(tree)
    in_function: set[ast.AST] = set()
    for func in ast.walk(tree):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            in_function.update(ast.walk(func))
    for node in ast.walk(tree):
        if node in skipped:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # `from a.b import c` imports a.b.c when that is a module, else the name c of a.b
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                     for alias in node.names]
        else:
            continue
        targets = sorted({name for name in names if name == PACKAGE or name.startswith(PACKAGE + ".")})
        if targets:
            yield node, targets, node in in_function


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: {target for _, targets, _ in first_party_imports(path, modules) for target in targets
                   if target in modules and target != name}
            for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a, b, ..., a) through each group of modules that import one another."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def strongconnect(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                strongconnect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            strongconnect(node)
    cycles = []
    for group in groups:  # a shortest way back to the group's first module, through the group only
        start, members = group[0], set(group)
        paths, seen = [[start]], {start}
        while paths:
            path = paths.pop(0)
            nxt = sorted(graph[path[-1]] & members)
            if start in nxt:
                cycles.append([*path, start])
                break
            for module in nxt:
                if module not in seen:
                    seen.add(module)
                    paths.append([*path, module])
    return cycles


def test_the_package_has_no_import_cycle():
    """Every import of the package's own modules, at module level or inside a function, counts:
    a cycle means one of them has to stay hidden (or half-initialised) to work at all."""
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_find_cycles_names_the_modules_of_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]


def test_first_party_imports_inside_functions_say_why():
    """An import of the package inside a function carries `# lazy: <reason>` on its line or the
    line above (heavy optional dependencies, a command kept free of torch, ...): everything else
    is imported at module level."""
    modules = package_modules()
    unexplained = []
    for path in modules.values():
        lines = path.read_text().splitlines()
        for node, _, inside in first_party_imports(path, modules):
            here, above = lines[node.lineno - 1], lines[node.lineno - 2] if node.lineno > 1 else ""
            if inside and "# lazy:" not in here and not above.strip().startswith("# lazy:"):
                unexplained.append(f"{path.relative_to(ROOT)}:{node.lineno}: {here.strip()}")
    assert not unexplained, "first-party imports inside functions without a `# lazy: <reason>` comment:\n" + \
        "\n".join(unexplained)
