"""setup.py: the shipped checkpoint is declared package data (no setuptools 'absent from packages'
warning), torch is imported only to build the extension (no NumPy warning from metadata steps), and
only latte_kernels and latteflow are installed (benchmarks/ runs from a checkout)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_RUN = """
import runpy, sys
sys.argv = ["setup.py", "-q", *sys.argv[1:]]
try:
    runpy.run_path("setup.py", run_name="__main__")
except SystemExit as e:
    assert not e.code, e.code
print("torch imported:", "torch" in sys.modules)
"""


def _setup(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONWARNINGS="default")
    return subprocess.run([sys.executable, "-c", _RUN, *args], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=300)


def test_build_py_copies_the_shipped_checkpoint_without_warnings(tmp_path):
    r = _setup("build_py", "--build-lib", str(tmp_path / "lib"))
    assert r.returncode == 0, r.stderr
    assert "absent from" not in r.stderr and "Warning" not in r.stderr, r.stderr
    assert "torch imported: False" in r.stdout  # nothing here builds the extension
    digits = tmp_path / "lib" / "latteflow" / "assets" / "digits"
    assert sorted(os.listdir(digits)) == ["MANIFEST.json", "config.json", "model.safetensors", "tokenizer.json"]
    assert (digits / "model.safetensors").stat().st_size == os.path.getsize(
        os.path.join(ROOT, "latteflow", "assets", "digits", "model.safetensors"))
    assert sorted(os.listdir(tmp_path / "lib")) == ["latte_kernels", "latteflow"]  # no top-level benchmarks


def test_metadata_does_not_import_torch(tmp_path):
    r = _setup("egg_info", "--egg-base", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "torch imported: False" in r.stdout and "NumPy" not in r.stderr, r.stderr
    sources = (tmp_path / "latteflow.egg-info" / "SOURCES.txt").read_text()
    assert "latteflow/assets/digits/model.safetensors" in sources
    top_level = (tmp_path / "latteflow.egg-info" / "top_level.txt").read_text().split()
    assert sorted(top_level) == ["latte_kernels", "latteflow"]
    assert "benchmarks/" not in sources


def test_benchmarks_run_from_the_checkout():
    r = subprocess.run([sys.executable, "-m", "benchmarks.e2e", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--modes" in r.stdout and "python -m benchmarks.e2e" in r.stdout
