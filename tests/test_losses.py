import math

import pytest
import torch

from model import losses


def test_kl_matches_closed_form_and_torch_distributions():
    mu = torch.tensor([[0.5, -1.0], [0.0, 2.0]], dtype=torch.float64)
    logvar = torch.tensor([[0.0, math.log(4.0)], [math.log(0.25), 0.0]], dtype=torch.float64)
    # 0.5 (σ² + μ² − 1 − ln σ²) per dimension, summed over dimensions, mean over events
    per = [0.5 * (1 + 0.25 - 1 - 0) + 0.5 * (4 + 1 - 1 - math.log(4)), 0.5 * (0.25 + 0 - 1 - math.log(0.25)) + 0.5 * 4]
    assert float(losses.kl_standard_normal(mu, logvar)) == pytest.approx(sum(per) / 2)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    assert float(losses.kl_standard_normal(mu, logvar)) == pytest.approx(
        float(torch.distributions.kl_divergence(q, p).sum(1).mean())
    )


def test_kl_is_zero_at_the_prior():
    assert float(losses.kl_standard_normal(torch.zeros(3, 2), torch.zeros(3, 2))) == 0.0


def test_reconstruction_is_summed_per_event_mean_over_events():
    x = torch.tensor([[0.0, 1.0, 0.5], [1.0, 1.0, 1.0]])
    r = torch.tensor([[0.5, 1.0, 0.5], [0.0, 1.0, 0.0]])
    assert float(losses.reconstruction(r, x)) == pytest.approx((0.25 + 2.0) / 2)


def test_cluster_ratio_known_answer():
    mu = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 0.0], [10.0, 2.0], [99.0, 99.0]])
    labels = torch.tensor([0, 0, 1, 1, -1])  # the unlabelled point is ignored
    # centres (1, 0) and (10, 1), every distance to its centre is 1 → within = 1;
    # both centres lie √(4.5² + 0.5²) from their mean (5.5, 0.5) → between = 4.5277
    expected = (1 + 1e-6) / (math.hypot(4.5, 0.5) + 1e-6)
    assert float(losses.cluster_ratio(mu, labels)) == pytest.approx(expected)


def test_cluster_ratio_needs_two_classes_but_keeps_a_graph():
    mu = torch.ones(3, 2, requires_grad=True)
    out = losses.cluster_ratio(mu, torch.tensor([0, 0, -1]))
    assert float(out.detach()) == 0.0
    out.backward()
    assert mu.grad is not None


def test_prototype_known_answer():
    # class 0 at (0, 0) and (2, 0): centre (1, 0); class 1 at (0, 2): centre (0, 2); the unlabelled row is ignored.
    mu = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [9.0, 9.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, -1])
    # squared distances to (centre 0, centre 1): (1, 4), (1, 8), (5, 0); CE = log(1 + exp(−margin))
    expected = (math.log1p(math.exp(-3)) + math.log1p(math.exp(-7)) + math.log1p(math.exp(-5))) / 3
    assert float(losses.prototype(mu, labels)) == pytest.approx(expected, rel=1e-6)
    # a temperature of 2 halves every margin
    expected_t2 = (math.log1p(math.exp(-1.5)) + math.log1p(math.exp(-3.5)) + math.log1p(math.exp(-2.5))) / 3
    assert float(losses.prototype(mu, labels, temperature=2.0)) == pytest.approx(expected_t2, rel=1e-6)


def test_prototype_is_not_scale_free_and_needs_two_classes():
    mu = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 1])
    # shrinking the latent does not satisfy it (the spread ratio would not change)
    assert float(losses.prototype(mu * 0.1, labels).detach()) > float(losses.prototype(mu, labels).detach()) + 0.5
    out = losses.prototype(mu, torch.tensor([0, 0, -1]))
    assert float(out.detach()) == 0.0
    out.backward()
    assert mu.grad is not None
