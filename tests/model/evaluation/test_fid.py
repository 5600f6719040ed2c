"""latteflow.evaluation.fid: clear errors for every missing piece (never a download), and the scores when
torch-fidelity (with a torchvision that matches this torch) is importable."""
import importlib.util
import os

import numpy as np
import pytest

from latteflow.evaluation import fid


@pytest.fixture
def pretend_installed(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(fid.importlib.util, "find_spec",
                        lambda name, *a: object() if name in ("torch_fidelity", "torchvision") else real(name, *a))


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_missing_package_is_named(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(fid.importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch_fidelity" else real(name, *a))
    with pytest.raises(ImportError, match="torch_fidelity.*pip install torch-fidelity"):
        fid.compute_metrics(np.zeros((4, 8, 8, 3), np.uint8), inception_weights=str(tmp_path / "w.pth"),
                            reference=str(tmp_path / "ref.npz"))


def test_missing_files_are_named(pretend_installed, tmp_path):
    weights, ref = tmp_path / "inception.pth", tmp_path / "ref.npz"
    images = np.zeros((4, 8, 8, 3), np.uint8)
    with pytest.raises(FileNotFoundError) as e:
        fid.compute_metrics(images, inception_weights=str(weights), reference=str(ref))
    assert "inception_weights" in str(e.value) and "inception.pth" in str(e.value) and "ref.npz" in str(e.value)
    weights.write_bytes(b"x")
    with pytest.raises(FileNotFoundError) as e:
        fid.compute_metrics(images, inception_weights=str(weights), reference=str(ref))
    assert "reference file" in str(e.value) and "inception_weights" not in str(e.value)
    _npz(ref, mu=np.zeros(2048))
    with pytest.raises(ValueError, match=r"lacks \['arr_0', 'sigma'\]"):
        fid.compute_metrics(images, inception_weights=str(weights), reference=str(ref))
    with pytest.raises(TypeError, match="inception_weights"):
        fid.compute_metrics(images, inception_weights=None, reference=str(ref))


def test_load_images(tmp_path):
    grey = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4, 1)
    rgb = fid.load_images(_npz(tmp_path / "s.npz", arr_0=grey))
    assert rgb.shape == (2, 4, 4, 3) and (rgb[..., 1] == grey[..., 0]).all()
    with pytest.raises(ValueError, match="uint8"):
        fid.load_images(np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="arr_0"):
        fid.load_images(_npz(tmp_path / "bad.npz", images=grey))
    with pytest.raises(FileNotFoundError, match="nope"):
        fid.load_images(str(tmp_path / "nope"))


def test_cli_reports_one_line(tmp_path, capsys):
    code = fid.main(["--samples", str(tmp_path / "s.npz"), "--inception-weights", str(tmp_path / "w.pth"),
                     "--reference", str(tmp_path / "r.npz")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "error" in err


def _torch_fidelity_works():
    try:
        import torch_fidelity.metric_fid  # noqa: F401  (imports torchvision)
        return True
    except Exception:
        return False


@pytest.mark.skipif(not _torch_fidelity_works(), reason="torch-fidelity with a matching torchvision not importable")
def test_scores_with_local_random_inception(tmp_path, monkeypatch):
    import torch
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    def no_download(*a, **k):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(fe, "load_state_dict_from_url", no_download)
    # random Inception weights in torch-fidelity's format, built without its loader
    monkeypatch.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
    monkeypatch.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
    torch.manual_seed(0)
    net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    weights = tmp_path / "inception.pth"
    torch.save(net.state_dict(), weights)
    monkeypatch.undo()
    monkeypatch.setattr(fe, "load_state_dict_from_url", no_download)
    g = np.random.default_rng(0)
    real = g.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
    ref = _npz(tmp_path / "ref.npz", arr_0=real, mu=np.zeros(2048), sigma=np.eye(2048))
    scores = fid.compute_metrics(real[:10], inception_weights=str(weights), reference=ref, batch_size=5,
                                 device="cpu", isc_splits=2)
    assert set(scores) == {"num_samples", "fid", "inception_score_mean", "inception_score_std", "precision", "recall"}
    assert np.isfinite(scores["fid"]) and scores["inception_score_mean"] >= 1.0 - 1e-6
    assert scores["precision"] == 1.0  # every sample is one of the reference images
