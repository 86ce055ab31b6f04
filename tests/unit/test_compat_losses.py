"""Compatibility losses checked on tiny tensors against values worked out by hand."""

import math

import pytest
import torch

from pipeline.compat.losses import (
    bct_loss,
    bt2_loss,
    compatible_part,
    dsimplex_loss,
    dsimplex_vertices,
    fastfill_loss,
    nt_xent,
    oca_loss,
    synthesize_old_classifier,
    transformation_loss,
)


def _lse(*xs: float) -> float:
    return math.log(sum(math.exp(x) for x in xs))


def test_nt_xent_matches_hand_computed_terms() -> None:
    # Rows r0=(1,0), r1=(0,1), r2=(.6,.8), r3=(-.6,.8); z1 is scaled to check the normalisation.
    z1 = torch.tensor([[3.0, 0.0], [0.0, 0.5]])
    z2 = torch.tensor([[0.6, 0.8], [-0.6, 0.8]])
    # Cosines: r0.r1=0, r0.r2=.6, r0.r3=-.6, r1.r2=.8, r1.r3=.8, r2.r3=.28.
    row0 = -0.6 + _lse(0.0, 0.6, -0.6)
    row1 = -0.8 + _lse(0.0, 0.8, 0.8)
    row2 = -0.6 + _lse(0.6, 0.8, 0.28)
    row3 = -0.8 + _lse(-0.6, 0.8, 0.28)
    expected = (row0 + row1 + row2 + row3) / 4
    assert nt_xent(z1, z2, temperature=1.0).item() == pytest.approx(expected, rel=1e-6)


def test_nt_xent_temperature_divides_similarities() -> None:
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    # Temperature 0.5 doubles every cosine: r0.r1=0, r0.r2=2, r0.r3=0, r1.r2=0, r1.r3=-2, r2.r3=0.
    row0 = -2.0 + _lse(0.0, 2.0, 0.0)
    row1 = 2.0 + _lse(0.0, 0.0, -2.0)
    row2 = -2.0 + _lse(2.0, 0.0, 0.0)
    row3 = 2.0 + _lse(0.0, -2.0, 0.0)
    expected = (row0 + row1 + row2 + row3) / 4
    assert nt_xent(z1, z2, temperature=0.5).item() == pytest.approx(expected, rel=1e-6)


def test_nt_xent_identical_rows_give_log_of_candidates() -> None:
    z = torch.ones(2, 3)
    # All 3 candidates per row tie, so each row's loss is log 3 whatever the temperature.
    assert nt_xent(z, z.clone(), temperature=0.1).item() == pytest.approx(math.log(3), rel=1e-6)


def test_nt_xent_rejects_mismatched_views() -> None:
    with pytest.raises(ValueError, match="must both be"):
        nt_xent(torch.ones(2, 3), torch.ones(3, 3))


def test_bct_loss_excludes_unknown_labels_from_influence_term() -> None:
    new_logits = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 1.0]])
    old_logits = torch.tensor([[0.5, 0.0], [1.0, 1.0]])
    labels = torch.tensor([0, 2])
    new_ce = ((-1.0 + _lse(1.0, 0.0, 0.0)) + (-1.0 + _lse(0.0, 2.0, 1.0))) / 2
    # Row 1 has label 2, which the 2-class old classifier cannot score: only row 0 counts.
    old_ce = -0.5 + _lse(0.5, 0.0)
    got = bct_loss(new_logits, old_logits, labels, lam=0.5)
    assert got.item() == pytest.approx(new_ce + 0.5 * old_ce, rel=1e-6)


def test_bct_loss_influence_is_zero_when_no_row_is_known() -> None:
    new_logits = torch.tensor([[0.0, 0.0, 3.0], [0.0, 0.0, 1.0]])
    old_logits = torch.tensor([[5.0, 0.0], [0.0, 5.0]], requires_grad=True)
    labels = torch.tensor([2, 2])
    new_ce = ((-3.0 + _lse(0.0, 0.0, 3.0)) + (-1.0 + _lse(0.0, 0.0, 1.0))) / 2
    got = bct_loss(new_logits, old_logits, labels, lam=2.0)
    assert got.item() == pytest.approx(new_ce, rel=1e-6)
    got.backward()
    assert old_logits.grad is not None and old_logits.grad.abs().sum().item() == 0.0


def test_synthesize_old_classifier_copies_known_rows_and_means_new_classes() -> None:
    weight = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    bias = torch.tensor([0.1, 0.2])
    features = torch.tensor([[9.0, 9.0], [1.0, 0.0], [3.0, 2.0], [-1.0, 5.0]])
    labels = torch.tensor([0, 2, 2, 3])
    w, b = synthesize_old_classifier(
        weight, bias, [0, 1], features, labels, num_classes=5, match_norm=False
    )
    expected_w = torch.tensor([[1.0, 2.0], [3.0, 4.0], [2.0, 1.0], [-1.0, 5.0], [0.0, 0.0]])
    assert torch.equal(w, expected_w)
    assert torch.allclose(b, torch.tensor([0.1, 0.2, 0.0, 0.0, 0.0]))


def test_synthesize_old_classifier_matches_the_known_rows_norm_and_bias() -> None:
    weight = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # norms sqrt(5) and 5
    bias = torch.tensor([0.1, 0.2])
    features = torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.0, -7.0]])
    labels = torch.tensor([2, 2, 3])  # class means (2, 1) and (0, -7)
    w, b = synthesize_old_classifier(weight, bias, [0, 1], features, labels, num_classes=4)
    target = (math.sqrt(5) + 5) / 2
    assert torch.allclose(w[:2], weight)
    assert torch.allclose(w[2], torch.tensor([2.0, 1.0]) / math.sqrt(5) * target)
    assert torch.allclose(w[3], torch.tensor([0.0, -target]))
    assert torch.allclose(b, torch.tensor([0.1, 0.2, 0.15, 0.15]))


def test_synthesize_old_classifier_validates_shapes() -> None:
    weight, bias = torch.zeros(2, 2), torch.zeros(2)
    with pytest.raises(ValueError, match="features must be"):
        synthesize_old_classifier(weight, bias, [0], torch.zeros(3, 4), torch.zeros(3), 3)
    with pytest.raises(ValueError, match="bias must be"):
        synthesize_old_classifier(weight, torch.zeros(3), [0], torch.zeros(3, 2), torch.zeros(3), 3)
    with pytest.raises(ValueError, match="known class 2"):
        synthesize_old_classifier(weight, bias, [2], torch.zeros(3, 2), torch.zeros(3), 3)


def test_transformation_loss_is_mean_squared_error() -> None:
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    target = torch.tensor([[0.0, 0.0], [0.0, 3.0]])
    # Squared errors 1, 4, 0, 9 over 4 entries.
    assert transformation_loss(pred, target).item() == pytest.approx(14.0 / 4)


def _fastfill_example() -> tuple[torch.Tensor, ...]:
    pred = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    target = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    logits = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    labels = torch.tensor([0, 1])
    return pred, target, logits, labels


def test_fastfill_loss_with_zero_log_variance_is_half_mse_plus_ce() -> None:
    pred, target, logits, labels = _fastfill_example()
    mse = [0.5, 2.0]  # (1 + 0) / 2 and (0 + 4) / 2
    ce = [-1.0 + _lse(1.0, 0.0), math.log(2)]
    expected = (0.5 * (mse[0] + ce[0]) + 0.5 * (mse[1] + ce[1])) / 2
    got = fastfill_loss(pred, torch.zeros(2), target, logits, labels, label_smoothing=0.0)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_fastfill_loss_with_log_two_variance_and_smoothing() -> None:
    pred, target, logits, labels = _fastfill_example()
    mse = [0.5, 2.0]
    # Smoothing 0.1 over 2 classes: 0.95 * nll(label) + 0.05 * nll(other class).
    nll0, nll1 = -1.0 + _lse(1.0, 0.0), _lse(1.0, 0.0)
    ce = [0.95 * nll0 + 0.05 * nll1, math.log(2)]
    s = math.log(2)
    # exp(-log 2) = 1/2.
    per_row = [0.5 * 0.5 * (mse[i] + ce[i]) + 0.5 * s for i in range(2)]
    log_var = torch.full((2, 1), s)
    got = fastfill_loss(pred, log_var, target, logits, labels, label_smoothing=0.1)
    assert got.item() == pytest.approx(sum(per_row) / 2, rel=1e-6)


def test_fastfill_loss_rejects_bad_log_var_shape() -> None:
    pred, target, logits, labels = _fastfill_example()
    with pytest.raises(ValueError, match="log_var must be"):
        fastfill_loss(pred, torch.zeros(2, 2), target, logits, labels)


def test_fastfill_loss_without_a_classifier_is_the_regression_term_alone() -> None:
    # A new model with no head and no labels: s still weighs each row's L2 error.
    pred, target, _, _ = _fastfill_example()
    s = math.log(2)
    mse = [0.5, 2.0]
    got = fastfill_loss(pred, torch.full((2,), s), target, None, None)
    assert got.item() == pytest.approx(sum(0.25 * m + 0.5 * s for m in mse) / 2, rel=1e-6)


def test_fastfill_loss_leaves_unlabelled_rows_out_of_the_classification_term() -> None:
    pred, target, logits, _ = _fastfill_example()
    mse = [0.5, 2.0]
    ce0 = -1.0 + _lse(1.0, 0.0)
    labels = torch.tensor([0, -1])  # row 1 has no label
    got = fastfill_loss(pred, torch.zeros(2), target, logits, labels, label_smoothing=0.0)
    assert got.item() == pytest.approx((0.5 * (mse[0] + ce0) + 0.5 * mse[1]) / 2, rel=1e-6)


# --- BT², d-Simplex, OCA -------------------------------------------------------------------


def test_compatible_part_is_the_leading_dims_and_checks_sizes() -> None:
    z = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert compatible_part(z, 2).tolist() == [[1.0, 2.0], [4.0, 5.0]]
    with pytest.raises(ValueError, match="at least as many"):
        compatible_part(z, 4)
    with pytest.raises(ValueError, match=r"\(N, d\)"):
        compatible_part(z[0], 1)


def test_bt2_loss_reads_only_the_compatible_dims_through_the_old_classifier() -> None:
    # psi has 3 dims; the old space has 2: old logits = psi[:, :2] @ W.T + b.
    psi = torch.tensor([[1.0, 0.0, 5.0]], requires_grad=True)
    new_logits = torch.tensor([[2.0, 0.0]])
    w_old = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b_old = torch.tensor([0.0, 0.5])
    y = torch.tensor([0])
    # new term: -2 + lse(2, 0); old logits (1, 0.5): -1 + lse(1, 0.5); lam = 0.5.
    expected = (-2 + _lse(2.0, 0.0)) + 0.5 * (-1 + _lse(1.0, 0.5))
    loss = bt2_loss(psi, new_logits, w_old, b_old, y, lam=0.5)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    assert psi.grad is not None and psi.grad[0, 2].item() == 0.0  # the extra dim is free
    assert w_old.grad is None and b_old.grad is None  # the old classifier stays frozen
    with pytest.raises(ValueError, match="old classifier"):
        bt2_loss(psi, new_logits, w_old, b_old[:1], y)


def test_dsimplex_vertices_form_a_regular_simplex_padded_with_zeros() -> None:
    v = dsimplex_vertices(3, 4)  # a triangle in the first 2 of 4 dims
    assert v.shape == (3, 4)
    assert v[:, 2:].abs().max().item() == 0.0
    gram = v @ v.T
    expected = torch.tensor([[1.0, -0.5, -0.5], [-0.5, 1.0, -0.5], [-0.5, -0.5, 1.0]])
    assert torch.allclose(gram, expected, atol=1e-6)
    # By hand (Helmert basis): rows (1/sqrt2, 1/sqrt6), (-1/sqrt2, 1/sqrt6), (0, -2/sqrt6),
    # each divided by its norm sqrt(2/3).
    s = math.sqrt(1.5)
    first = [s / math.sqrt(2), s / math.sqrt(6)]
    assert v[0, :2].tolist() == pytest.approx(first, abs=1e-6)
    assert dsimplex_vertices(2, 1).tolist() == [[1.0], [-1.0]]
    ten = dsimplex_vertices(10, 9)
    off = (ten @ ten.T)[~torch.eye(10, dtype=torch.bool)]
    assert torch.allclose(off, torch.full_like(off, -1 / 9), atol=1e-6)
    with pytest.raises(ValueError, match="at least 2 dims"):
        dsimplex_vertices(3, 1)


def test_dsimplex_loss_is_the_ce_of_the_fixed_vertices() -> None:
    v = dsimplex_vertices(2, 2)  # (1, 0) and (-1, 0)
    emb = torch.tensor([[2.0, 7.0]])  # logits (2, -2): the padded dim does not count
    loss = dsimplex_loss(emb, v, torch.tensor([1]))
    assert loss.item() == pytest.approx(2.0 + _lse(2.0, -2.0), abs=1e-6)
    with pytest.raises(ValueError, match="share d"):
        dsimplex_loss(emb, v[:, :1], torch.tensor([1]))


def test_oca_loss_is_a_cosine_softmax_against_the_old_prototypes() -> None:
    new_logits = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    projected = torch.tensor([[3.0, 4.0], [1.0, 1.0]], requires_grad=True)  # cos: norm only
    prototypes = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # two old classes; class 2 is new
    y = torch.tensor([1, 2])
    new_term = ((-0.0 + _lse(1.0, 0.0, 0.0)) + (-0.0 + _lse(0.0, 0.0, 0.0))) / 2
    # Row 0: cosines (0.6, 0.8) / T=0.5 -> (1.2, 1.6), label 1; row 1 has no old prototype.
    old_term = -1.6 + _lse(1.2, 1.6)
    loss = oca_loss(new_logits, projected, prototypes, y, lam=2.0, temperature=0.5)
    assert loss.item() == pytest.approx(new_term + 2.0 * old_term, abs=1e-6)
    loss.backward()
    assert projected.grad is not None and projected.grad[1].abs().max().item() == 0.0
    with pytest.raises(ValueError, match="temperature"):
        oca_loss(new_logits, projected, prototypes, y, temperature=0.0)
