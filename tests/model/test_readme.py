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
