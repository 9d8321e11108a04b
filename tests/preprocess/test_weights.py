"""U-Net border weight maps against a brute-force evaluation of the paper's formula."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.preprocess.weights import border_weights, class_weights, components


def brute_force(classes: np.ndarray, instances: np.ndarray, w0: float, sigma: float) -> np.ndarray:
    """w_c + w0 exp(-(d1+d2)^2 / 2 sigma^2) on background, distances by explicit search."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in classes.shape], indexing="ij"), -1)
    pts = grid.reshape(-1, classes.ndim).astype(float)
    dists = []
    for k in np.unique(instances[instances > 0]):
        obj = pts[(instances == k).reshape(-1)]
        d = np.sqrt(((pts[:, None, :] - obj[None, :, :]) ** 2).sum(-1)).min(1)
        dists.append(d)
    dists = np.sort(np.stack(dists), axis=0)
    border = w0 * np.exp(-((dists[0] + dists[1]) ** 2) / (2 * sigma**2))
    border = border.reshape(classes.shape) * ((classes == 0) & (instances == 0))
    return class_weights(classes) + border


@pytest.fixture
def touching_squares() -> tuple[np.ndarray, np.ndarray]:
    inst = np.zeros((40, 44, 1), dtype=np.int32)
    inst[8:20, 6:18] = 1
    inst[8:20, 18:30] = 2  # shares an edge with square 1
    inst[26:34, 10:16] = 3
    return (inst > 0).astype(np.int16), inst


def test_touching_squares_match_brute_force(touching_squares) -> None:
    classes, inst = touching_squares
    w = border_weights(classes, inst, w0=10.0, sigma=5.0)
    ref = brute_force(classes, inst, 10.0, 5.0)
    np.testing.assert_allclose(w, ref, atol=2e-3)  # beyond the window the term is < 1e-3
    # the gap between squares 1+2 and square 3 is where weights are high
    assert w[23, 12, 0] > w[2, 40, 0] + 3


def test_components_separate_only_disjoint_objects(touching_squares) -> None:
    classes, inst = touching_squares
    comp = components(classes)
    assert comp.max() == 2  # the touching squares merge into one component
    w = border_weights(classes, w0=10.0, sigma=5.0)
    np.testing.assert_allclose(w, brute_force(classes, comp, 10.0, 5.0), atol=2e-3)


def test_class_weights_balance_the_classes() -> None:
    classes = np.zeros((10, 10, 1), dtype=np.int16)
    classes[:2] = 1
    classes[9, 9] = -1
    wc = class_weights(classes)
    assert wc[classes == -1].sum() == 0
    assert wc[classes == 0].sum() == pytest.approx(wc[classes == 1].sum())
    assert wc[classes >= 0].mean() == pytest.approx(1.0)


def test_single_object_gets_class_weights_only() -> None:
    classes = np.zeros((12, 12, 1), dtype=np.int16)
    classes[3:6, 3:6] = 1
    np.testing.assert_array_equal(border_weights(classes), class_weights(classes))
