"""latteflow's import graph: imports only go down the map in ``latteflow/__init__.py``.

Every import of every latteflow module (at module level and inside functions) is read with ``ast``, so
a lazy import counts as much as a top-level one. The layers, bottom to top:

    0  core, distributed      the model itself; process-group plumbing
    1  text, data             tokenizer and backbones; datasets and latent spaces
    2  pipeline, training     load a checkpoint and sample it; train one
    3  evaluation             scores, FID, distributed sampling, speed
    4  apps                   the command line, the digits recipe, experiments, bench
    5  latteflow/__init__.py, __main__.py (the public names and ``python -m latteflow``)

A module imports from its own package or from a lower layer, never from a sibling on its own layer
(text and data stay independent, so do pipeline and training) and never from above.
"""
import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "latteflow"
LAYERS = {"core": 0, "distributed": 0, "text": 1, "data": 1, "pipeline": 2, "training": 2, "evaluation": 3,
          "apps": 4, "__init__": 5, "__main__": 5}
CORE_MAY_IMPORT = {"torch", "transformers", "numpy", "safetensors", "tqdm", "latte_kernels", "latteflow"}
MAX_LINES = 600
MAX_TOP_LEVEL = 10


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "assets" not in p.relative_to(PACKAGE).parts)


def _name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path = ROOT):
    """``(line, dotted name)`` of everything ``path`` imports: ``import a.b`` gives ``a.b``; ``from a import
    b`` gives ``a.b`` (``b`` may be a module or a name in ``a``); relative imports are resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = _name(path, root).split(".")
    if path.name != "__init__.py":
        here = here[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here[:len(here) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base == "__future__":
                continue
            found += [(node.lineno, f"{base}.{a.name}" if a.name != "*" else base) for a in node.names]
        elif isinstance(node, ast.Call) and _called(node.func) in ("import_module", "__import__") and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            found.append((node.lineno, node.args[0].value))  # importlib.import_module("a.b") with a literal name
    return found


def _called(func) -> str:
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def _layer_of(dotted: str):
    """``(sub-package or top-level module, layer)`` of a latteflow module name, or None for another package."""
    parts = dotted.split(".")
    if parts[0] != "latteflow":
        return None
    head = parts[1] if len(parts) > 1 else "__init__"
    if head not in LAYERS and len(parts) == 2:  # ``from latteflow import Name``: the package's public names
        head = "__init__"
    return head, LAYERS.get(head)


ALL = [(p, line, dotted) for p in _modules() for line, dotted in imports(p)]


def _where(path, line):
    return f"{path.relative_to(ROOT)}:{line}"


def test_the_checker_reads_lazy_and_relative_imports(tmp_path):
    pkg = tmp_path / "latteflow" / "core"
    pkg.mkdir(parents=True)
    f = pkg / "mod.py"
    f.write_text("import os\nfrom . import layers\n\ndef g():\n    from ..apps.cli import main\n    import benchmarks.e2e\n"
                 "    importlib.import_module('benchmarks.plot')\n")
    got = [d for _, d in imports(f, tmp_path)]
    assert got == ["os", "latteflow.core.layers", "latteflow.apps.cli.main", "benchmarks.e2e", "benchmarks.plot"]


def test_every_subpackage_and_top_level_module_has_a_layer():
    heads = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in _modules()}
    assert heads <= set(LAYERS), f"not on the map (LAYERS here and latteflow/__init__.py): {sorted(heads - set(LAYERS))}"


def test_latteflow_never_imports_benchmarks():
    bad = [f"{_where(p, n)} imports {d}" for p, n, d in ALL if d.split(".")[0] == "benchmarks"]
    assert not bad, "\n".join(bad)


def test_no_private_module_or_name_of_another_package():
    bad = []
    for p, n, d in ALL:
        parts = d.split(".")
        if parts[0] == "latte_kernels" and any(x.startswith("_") for x in parts[1:]):
            bad.append(f"{_where(p, n)} imports {d}")
        elif parts[0] == "latteflow" and any(x.startswith("_") and x != "__init__" for x in parts[1:]):
            own = _layer_of(_name(p))[0]
            if _layer_of(d)[0] != own:
                bad.append(f"{_where(p, n)} imports {d}, private to another sub-package")
    assert not bad, "\n".join(bad)


def test_core_imports_only_torch_transformers_and_the_kernels_public_api():
    stdlib = set(sys.stdlib_module_names)
    bad = []
    for p, n, d in ALL:
        if _layer_of(_name(p))[0] != "core":
            continue
        top = d.split(".")[0]
        if top not in stdlib | CORE_MAY_IMPORT or (top == "latteflow" and not d.startswith("latteflow.core.")):
            bad.append(f"{_where(p, n)} imports {d}")
    assert not bad, "\n".join(bad)


def test_imports_only_go_down():
    bad = []
    for p, n, d in ALL:
        target = _layer_of(d)
        if target is None:
            continue
        (own, mine), (theirs, layer) = _layer_of(_name(p)), target
        if own == theirs:
            continue
        if layer is None or layer > mine:
            bad.append(f"{_where(p, n)}: {own} (layer {mine}) imports {d} ({theirs}, layer {layer})")
        elif layer == mine:
            bad.append(f"{_where(p, n)}: {own} imports {d} from its sibling {theirs} on layer {mine}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_over_600_lines(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def test_top_level_holds_at_most_ten_modules():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL, top


def test_the_package_docstring_maps_every_subpackage():
    import latteflow

    doc = latteflow.__doc__ or ""
    heads = {h for h in LAYERS if not h.startswith("__")}
    missing = sorted(h for h in heads if f"{h}/" not in doc and f"{h}.py" not in doc)
    assert not missing, f"latteflow/__init__.py's map does not name {missing}"
