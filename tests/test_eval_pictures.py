"""PNG plots and the self-contained HTML token view (rendered in headless Chromium)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import matplotlib.image
import numpy as np
import pytest
import torch

from aha.report.plots import (
    WindowPoint,
    plot_global_fraction_vs_position,
    plot_global_fraction_vs_window,
    plot_layer_head_heatmap,
)
from aha.report.token_view import write_token_view
from aha.stats import RoutingStats

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHADE_RGB = np.array([214, 39, 40]) / 255  # the page's shading colour at full strength


def _stats() -> RoutingStats:
    stats = RoutingStats(window=8, num_layers=3, num_heads=4)
    route = torch.zeros(2, 4, 40, dtype=torch.bool)
    route[:, 1, 20:] = True
    stats.update(layer=1, route=route)
    stats.update(layer=0, route=torch.zeros(2, 4, 40, dtype=torch.bool))
    return stats


def _is_png(path) -> bool:
    image = matplotlib.image.imread(path)
    return image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_plots_write_pngs(tmp_path):
    stats = _stats()
    points = [WindowPoint(64, 0.4, 12.0), WindowPoint(16, 0.9, 12.5), WindowPoint(256, 0.1, 11.9)]
    paths = [
        plot_global_fraction_vs_window(points, tmp_path / "tail.png", full_attention_perplexity=11.8),
        plot_layer_head_heatmap(stats, tmp_path / "heat.png"),
        plot_global_fraction_vs_position(stats, tmp_path / "pos.png", bucket=4),
    ]
    assert all(_is_png(p) for p in paths)


def test_plots_reject_empty_input(tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        plot_global_fraction_vs_window([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="track_routing"):
        plot_global_fraction_vs_position(RoutingStats(8, 2, 2), tmp_path / "x.png")


def _page_data(path) -> dict:
    text = path.read_text()
    match = re.search(r'<script type="application/json" id="routing-data">(.*?)</script>', text, re.DOTALL)
    return json.loads(match.group(1))


def test_token_view_is_self_contained_and_escapes(tmp_path):
    tokens = ["Hello", " </script><script>alert(1)</script>", " world", "\n", " é"]
    routes = torch.zeros(2, 3, len(tokens), dtype=torch.bool)
    routes[1, :2, 2] = True
    page = write_token_view(tokens, routes, tmp_path / "view.html", title="<b>t</b>")
    text = page.read_text()
    assert "http://" not in text and "https://" not in text and "<link" not in text
    assert "<title>&lt;b&gt;t&lt;/b&gt;</title>" in text
    data = _page_data(page)
    assert data["tokens"] == tokens
    assert data["global_heads"] == [[0, 0, 0, 0, 0], [0, 0, 2, 0, 0]]
    assert data["num_heads"] == 3


def test_token_view_rejects_mismatched_routes(tmp_path):
    with pytest.raises(ValueError, match="one column per token"):
        write_token_view(["a", "b"], torch.zeros(2, 3, 5, dtype=torch.bool), tmp_path / "v.html")


def _screenshot(page, shot, tmp_path, fragment: str = "") -> np.ndarray:
    subprocess.run(
        [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium-profile'}", f"--screenshot={shot}", "--window-size=1200,900",
            page.resolve().as_uri() + fragment,
        ],
        check=True, capture_output=True, timeout=120,
    )
    return matplotlib.image.imread(shot)[..., :3]


def _shaded_text_pixels(image: np.ndarray) -> int:
    """Pixels close to the full-strength shading colour below the header (which holds the legend bar)."""
    text_area = image[150:]
    return int((np.abs(text_area - SHADE_RGB).max(axis=-1) < 0.08).sum())


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/setup-system.sh installs it)")
def test_token_view_renders_in_headless_chromium(tmp_path):
    tokens = [f" token{i}" for i in range(120)]
    routes = torch.zeros(4, 6, len(tokens), dtype=torch.bool)
    routes[2, :, ::2] = True  # only layer 2 routes anything global: every head, every other token
    page = write_token_view(tokens, routes, tmp_path / "view.html", subtitle="test page")

    shot = tmp_path / "layer2.png"
    layer2 = _screenshot(page, shot, tmp_path, "#layer=2")
    layer0 = _screenshot(page, tmp_path / "layer0.png", tmp_path, "#layer=0")
    assert shot.stat().st_size > 0
    assert _shaded_text_pixels(layer2) > 5000, "layer 2 routes half the tokens global with all heads: they must be shaded"
    assert _shaded_text_pixels(layer0) == 0, "layer 0 routes nothing global: no token may be shaded"


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/setup-system.sh installs it)")
def test_hostile_tokens_and_urls_do_not_break_the_token_view(tmp_path):
    """Tokens that open an HTML comment or a script, and a URL hash that is not a layer, still render."""
    hostile = [" <!--<script>", " </script><script>document.body.innerHTML=''</script>", " <!--", " -->", ' "]']
    tokens = hostile + [f" token{i}" for i in range(120)]
    routes = torch.ones(2, 6, len(tokens), dtype=torch.bool)  # every token shaded on every layer
    page = write_token_view(tokens, routes, tmp_path / "view.html")
    assert "<!--" not in page.read_text().split('id="routing-data">')[1].split("</script>")[0]
    assert _page_data(page)["tokens"] == tokens
    shot = _screenshot(page, tmp_path / "hostile.png", tmp_path, '#layer=%22%5D%3Cimg%20src%3Dx%3E')
    assert _shaded_text_pixels(shot) > 5000, "the page must still render its tokens"
