"""The digits scorer: a good classifier, and scores that separate real digits from noise and collapse."""
import numpy as np
import pytest
import torch

from latteflow.data.digits import load_digits_split
from latteflow.evaluation.scores import (evaluate, frechet_distance, gaussian_statistics, get_classifier,
                                within_class_spread)
from latteflow.data.images import to_uint8


@pytest.fixture(scope="module")
def split():
    return load_digits_split(0)


def test_classifier_is_accurate_cached_and_deterministic(split):
    clf = get_classifier(0)
    print(f"digits classifier held-out accuracy: {clf.test_accuracy:.4f}")
    assert clf.test_accuracy > 0.95
    assert get_classifier(0) is clf
    fresh = type(clf)(0)
    assert np.array_equal(fresh.features(split.test_images), clf.features(split.test_images))
    assert clf.features(split.test_images[:5]).shape == (5, 64)


def test_real_digits_score_well(split):
    own = evaluate(split.test_images, split.test_labels)
    assert own.accuracy > 0.95 and own.num_samples == 360
    assert own.frechet_distance < 1e-6  # the held-out set against itself
    assert own.spread_generated == pytest.approx(own.spread_real)
    train = evaluate(split.train_images, split.train_labels)
    assert train.accuracy > 0.95 and train.frechet_distance < 3.0
    # uint8 (B, H, W, C) input, as the pipeline returns it, scores the same up to quantisation
    q = evaluate(to_uint8(split.test_images), split.test_labels.tolist())
    assert q.accuracy > 0.95 and q.frechet_distance < 0.01


def test_noise_scores_badly(split):
    g = torch.Generator().manual_seed(1)
    noise = torch.rand(500, 1, 8, 8, generator=g) * 2 - 1
    labels = torch.arange(500) % 10
    r = evaluate(noise, labels)
    assert 0.0 <= r.accuracy < 0.25
    real_small = evaluate(split.train_images[:500], split.train_labels[:500])
    assert r.frechet_distance > 20 * real_small.frechet_distance


def test_collapse_shows_in_spread_and_distance(split):
    # one real image per class, repeated: accurate, but no diversity
    reps = torch.stack([split.train_images[split.train_labels == d][0] for d in range(10)]).repeat(20, 1, 1, 1)
    labels = torch.arange(200) % 10
    r = evaluate(reps, labels)
    assert r.accuracy > 0.9
    assert r.spread_generated == 0.0 and r.spread_real > 0.3
    assert r.frechet_distance > 5 * evaluate(split.train_images[:200], split.train_labels[:200]).frechet_distance


def test_frechet_distance_matches_closed_form():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 4))
    s1, s2 = a @ a.T + np.eye(4), np.diag([1.0, 2.0, 3.0, 4.0])
    mu1, mu2 = np.zeros(4), np.ones(4)
    from scipy.linalg import sqrtm
    expect = 4.0 + np.trace(s1 + s2 - 2 * np.real(sqrtm(s1 @ s2)))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expect, rel=1e-9)
    # diagonal covariances: sum of (sqrt(a) - sqrt(b))^2
    d1, d2 = np.array([1.0, 4.0]), np.array([9.0, 1.0])
    assert frechet_distance(np.zeros(2), np.diag(d1), np.zeros(2), np.diag(d2)) == pytest.approx(5.0)
    # singular covariances stay finite and real
    f = rng.standard_normal((3, 8))
    m, s = gaussian_statistics(f)
    assert np.isfinite(frechet_distance(m, s, m + 1, s)) and frechet_distance(m, s, m + 1, s) == pytest.approx(8.0)


def test_spread_and_bad_arguments(split):
    x = torch.zeros(4, 1, 8, 8)
    x[1] = 1.0
    assert within_class_spread(x, [0, 0, 1, 1]) == pytest.approx(np.sqrt(0.5) / 2)
    with pytest.raises(ValueError, match="labels"):
        evaluate(split.test_images[:10], torch.arange(9))
    with pytest.raises(ValueError, match="labels"):
        evaluate(split.test_images[:3], [0, 1, 10])
    with pytest.raises(ValueError, match="images"):
        evaluate(torch.zeros(4, 1, 16, 16), [0, 1, 2, 3])
    with pytest.raises(ValueError, match="images"):
        evaluate(split.test_images[:1], [0])
    with pytest.raises(TypeError, match="images"):
        evaluate(torch.zeros(4, 1, 8, 8, dtype=torch.int32), [0, 1, 2, 3])
