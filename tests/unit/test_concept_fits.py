"""The pure parts of concepts: the explained variance, matching by codes, the strongest images,
the autoencoder's start and PCA's fit, on small arrays."""

import numpy as np
import pytest

from tb_microscope.analysis.concepts import (
    check_concepts_method,
    code_correlations,
    explained_variance,
    fit_dictionary,
    match_codes,
    spread_rows,
    strongest_images,
)


def test_explained_variance_is_r2_about_each_units_mean_clipped_to_0_1():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5)) + 10  # the mean is not variance
    assert explained_variance(x, x) == 1.0
    assert explained_variance(x, np.broadcast_to(x.mean(0), x.shape)) == pytest.approx(0.0)
    noise = rng.normal(size=x.shape)
    half = x + noise * np.sqrt(0.5 * x.var(0) / noise.var(0))  # error of half the variance
    assert explained_variance(x, half) == pytest.approx(0.5, abs=0.02)
    assert explained_variance(x, -x) == 0.0  # worse than the mean: clipped
    constant = np.ones((10, 3))
    assert explained_variance(constant, constant) == 1.0
    assert explained_variance(constant, constant * 2) == 0.0


def test_matching_by_codes_undoes_a_permutation_whatever_the_scale():
    rng = np.random.default_rng(1)
    reference = np.abs(rng.normal(size=(500, 6)))
    permutation = np.array([3, 0, 5, 1, 4, 2])
    codes = 2.5 * reference[:, permutation] + 0.01 * rng.normal(size=(500, 6))
    order, similarity, signs = match_codes(codes, reference)
    np.testing.assert_array_equal(codes[:, order], codes[:, np.argsort(permutation)])
    np.testing.assert_array_equal(permutation[order], np.arange(6))
    assert similarity.min() > 0.99 and (signs == 1).all()


def test_unsigned_matching_flips_anticorrelated_axes_and_signed_matching_does_not():
    rng = np.random.default_rng(2)
    reference = rng.normal(size=(400, 3))
    codes = reference * np.array([1.0, -1.0, 1.0])
    order, similarity, signs = match_codes(codes, reference, signed=False)
    np.testing.assert_array_equal(order, [0, 1, 2])
    np.testing.assert_array_equal(signs, [1, -1, 1])
    np.testing.assert_allclose(similarity, 1.0)
    _, signed_similarity, signed_signs = match_codes(codes, reference, signed=True)
    assert (signed_signs == 1).all() and signed_similarity.min() < 0


def test_a_concept_that_never_varies_has_no_correlation_and_is_matched_last():
    rng = np.random.default_rng(3)
    reference = np.abs(rng.normal(size=(300, 3)))
    codes = reference.copy()
    codes[:, 1] = 0.0  # died
    matrix = code_correlations(codes, reference)
    assert np.isnan(matrix[:, 1]).all() and not np.isnan(matrix[:, [0, 2]]).any()
    order, similarity, _ = match_codes(codes, reference)
    np.testing.assert_array_equal(order, [0, 1, 2])
    assert np.isnan(similarity[1]) and similarity[[0, 2]].min() > 0.999


def test_strongest_images_take_each_images_best_position_once_strongest_first():
    sources = np.array([[0, 0, 0], [0, 0, 1], [1, 0, 0], [1, 1, 1], [2, 0, 0], [5, 0, 0]])
    codes = np.array([[0.1, 0], [0.9, 0], [0.5, 1], [0.2, 3], [0.0, 2], [0.7, 0]])
    top = strongest_images(codes, sources, count=3)
    np.testing.assert_array_equal(top, [[0, 5, 1], [1, 2, 0]])
    assert strongest_images(codes, sources).shape == (2, 4)  # only 4 images were sampled


def test_the_autoencoders_start_is_unit_rows_spread_apart_and_seeded():
    rng = np.random.default_rng(4)
    x = np.concatenate([np.zeros((50, 4)), rng.normal(size=(300, 4))])
    start = spread_rows(x, 6, seed=0)
    assert start.shape == (6, 4) and start.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(start, axis=1), 1, atol=1e-6)
    np.testing.assert_array_equal(start, spread_rows(x, 6, seed=0))
    assert not np.array_equal(start, spread_rows(x, 6, seed=1))
    few = spread_rows(np.eye(2, 4), 3, seed=0)  # two rows to start from, one made up
    assert few.shape == (3, 4) and {tuple(r) for r in few[:2]} == {(1, 0, 0, 0), (0, 1, 0, 0)}


def test_pca_and_nmf_fit_a_planted_low_rank_dictionary():
    rng = np.random.default_rng(5)
    atoms = np.abs(rng.normal(size=(3, 8)))
    codes = np.abs(rng.normal(size=(400, 3))) * (rng.random((400, 3)) < 0.5)
    x = codes @ atoms
    pca = fit_dictionary(x, 3, "pca", 0)
    assert pca.explained == pytest.approx(1.0)
    np.testing.assert_allclose(pca.directions @ pca.directions.T, np.eye(3), atol=1e-5)
    assert (np.abs(pca.directions).argmax(1) == pca.directions.argmax(1)).all()  # signs fixed
    nmf = fit_dictionary(x, 3, "nmf", 0)
    assert nmf.explained > 0.999 and (nmf.directions >= 0).all()
    unit_atoms = atoms / np.linalg.norm(atoms, axis=1, keepdims=True)
    assert (nmf.directions @ unit_atoms.T).max(1).min() > 0.99
    with pytest.raises(ValueError, match="at most the node's 8 units for method 'pca'"):
        fit_dictionary(x, 9, "pca", 0)
    with pytest.raises(ValueError, match="at most the 400 sampled activations"):
        fit_dictionary(x[:400], 401, "sae", 0)
    with pytest.raises(ValueError, match="concepts method 'ica' is not known"):
        check_concepts_method("ica")
