import pytest
import torch

from aha import OPEN_BIAS, Router, RoutingStats, ideal_cost_ratio, route_from_logits


def test_open_router_routes_everything_global():
    router = Router(16, 3, init="open")
    logits = router(torch.randn(2, 5, 16))
    assert logits.shape == (2, 3, 5)
    route, g_soft = route_from_logits(logits)
    assert route.dtype == torch.bool and route.all()
    torch.testing.assert_close(g_soft, torch.full_like(g_soft, torch.sigmoid(torch.tensor(OPEN_BIAS)).item()))


def test_random_router_is_mixed():
    torch.manual_seed(0)
    route, _ = route_from_logits(Router(64, 4, init="random")(torch.randn(1, 200, 64)))
    assert 0.3 < route.float().mean() < 0.7


def test_straight_through_gate_is_binary_forward_sigmoid_backward():
    logits = torch.tensor([[[-2.0, 0.5, 3.0]]], requires_grad=True)
    gate, g_soft = route_from_logits(logits, straight_through=True)
    assert gate.tolist() == [[[0.0, 1.0, 1.0]]]
    gate.sum().backward()
    torch.testing.assert_close(logits.grad, (g_soft * (1 - g_soft)).detach())


def test_straight_through_gate_is_exactly_zero_or_one_for_every_logit():
    """The attention op takes the STE gate as binary without reading it (route_is_binary); with
    (g_hard + g_soft) - g_soft rounding left 1 - 2**-24 for about one logit in eight."""
    logits = torch.randn(2, 9, 4096, generator=torch.Generator().manual_seed(0)) * 3
    gate, _ = route_from_logits(logits.requires_grad_(True), straight_through=True)
    assert bool(((gate == 0) | (gate == 1)).all())


def test_threshold_polarity():
    logits = torch.logit(torch.tensor([[[0.2, 0.6, 0.9]]]))
    assert route_from_logits(logits, threshold=0.7)[0].tolist() == [[[False, False, True]]]
    with pytest.raises(ValueError):
        route_from_logits(logits, threshold=1.0)


def test_router_init_errors():
    with pytest.raises(ValueError, match="needs a bias"):
        Router(4, 2, init="open", bias=False)
    with pytest.raises(ValueError, match="unknown router init"):
        Router(4, 2, init="closed")


def test_stats_counts_fractions_and_compute():
    stats = RoutingStats(window=2, num_layers=2, num_heads=2)
    route = torch.tensor([[[True, False, False, True], [False, False, False, False]]])  # [1, 2, 4]
    stats.update(0, route)
    stats.update(1, torch.ones(1, 2, 4, dtype=torch.bool))
    assert stats.global_fraction == pytest.approx((2 + 0 + 8) / 16)
    assert stats.operations_replaced == pytest.approx(1 - 10 / 16)
    torch.testing.assert_close(stats.per_layer(), torch.tensor([0.25, 1.0], dtype=torch.float64))
    torch.testing.assert_close(stats.per_head()[0], torch.tensor([0.5, 0.0], dtype=torch.float64))
    # per-query costs at positions 0..3: full 1,2,3,4; local min(p+1, 2) = 1,2,2,2
    layer0 = (1 + 2 + 2 + 4) + (1 + 2 + 2 + 2)
    layer1 = 2 * (1 + 2 + 3 + 4)
    assert stats.computed_scores == layer0 + layer1
    assert stats.full_scores == 4 * 10
    torch.testing.assert_close(stats.per_position(), torch.tensor([0.75, 0.5, 0.5, 0.75], dtype=torch.float64))
    assert stats.to_dict()["compute_ratio"] == pytest.approx((layer0 + layer1) / 40)


def test_stats_count_the_sink_keys_in_the_local_cost():
    stats = RoutingStats(window=2, num_layers=1, num_heads=1, sink=1)
    stats.update(0, torch.zeros(1, 1, 5, dtype=torch.bool))
    assert stats.computed_scores == 1 + 2 + 3 + 3 + 3  # min(p + 1, window + sink)
    assert stats.to_dict()["sink"] == 1
    with pytest.raises(ValueError, match="different windows"):
        RoutingStats.merge([stats, RoutingStats(window=2, num_layers=1, num_heads=1)])


def test_stats_ignores_padding_and_tracks_prefix_positions():
    stats = RoutingStats(window=4, num_layers=1, num_heads=1)
    stats.update(0, torch.tensor([[[True, False]]]), first_position=3, valid=torch.tensor([[True, False]]))
    assert stats.global_fraction == 1.0
    assert stats.full_scores == 4 and stats.computed_scores == 4
    assert stats.per_position().shape == (5,)


def test_ideal_cost_ratio():
    assert ideal_cost_ratio(0.07, 256, 4096) == pytest.approx(0.07 + 0.93 * 0.125)
    assert ideal_cost_ratio(0.0, 4096, 1024) == 1.0
