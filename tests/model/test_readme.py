"""Every ```python block of README.md runs as written (each in a fresh namespace, in a scratch folder)."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BLOCKS = re.findall(r"^```python\n(.*?)^```", open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
                    flags=re.S | re.M)


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 2  # the pipeline and the model API


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[index], f"README.md python block {index + 1}", "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out  # every block prints what it made


DOCS = ["README.md", "benchmarks/README.md", *(f"docs/{n}" for n in sorted(os.listdir(os.path.join(ROOT, "docs")))
                                                if n.endswith(".md"))]


def test_every_latteflow_path_the_docs_name_exists():
    """``latteflow/x/y.py`` files and ``latteflow.x.y`` modules (``python -m`` entry points included) that the
    README and docs/ name are there: a module move changes the docs with it."""
    import importlib.util

    def is_module(dotted):
        try:
            return importlib.util.find_spec(dotted) is not None
        except ModuleNotFoundError:  # a parent that is a module, not a package
            return False

    missing = []
    for doc in DOCS:
        text = open(os.path.join(ROOT, doc), encoding="utf-8").read()
        for path in set(re.findall(r"\blatteflow/[\w/]+\.py\b", text)):
            if not os.path.isfile(os.path.join(ROOT, path)):
                missing.append(f"{doc}: {path}")
        for name in set(re.findall(r"\blatteflow(?:\.\w+)+", text)):
            parts = name.split(".")
            # the longest prefix that is a module; what follows it must be an attribute of it
            for i in range(len(parts), 0, -1):
                if is_module(".".join(parts[:i])):
                    break
            obj = importlib.import_module(".".join(parts[:i]))
            for attr in parts[i:]:
                if not hasattr(obj, attr):
                    missing.append(f"{doc}: {name}")
                    break
                obj = getattr(obj, attr)
    assert not missing, "\n".join(missing)
