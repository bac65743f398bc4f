"""A self-contained HTML page that shades every token of a text by how many heads routed it global.

One file, no network: the data sits in an inline JSON block and a short inline script renders
it, so the page opens from disk in any browser. A selector switches between single layers and
"all layers" (heads summed over every layer); ``page.html#layer=3`` opens on layer 3.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>__TITLE__</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 24px; color: #222; background: #fff; }
  h1 { font-size: 20px; margin: 0 0 8px; }
  .meta { color: #555; font-size: 13px; margin-bottom: 12px; }
  .controls { margin: 12px 0; font-size: 14px; }
  .legend { display: inline-flex; align-items: center; gap: 6px; margin-left: 18px; }
  .legend .bar { width: 160px; height: 12px; border: 1px solid #ccc;
                 background: linear-gradient(to right, rgba(214,39,40,0), rgba(214,39,40,1)); }
  #text { font-family: ui-monospace, monospace; font-size: 14px; line-height: 1.9;
          white-space: pre-wrap; word-break: break-word; border: 1px solid #ddd; padding: 12px; }
  #text span { border-radius: 2px; }
  #text span:hover { outline: 1px solid #333; }
</style>
</head>
<body>
<h1>__TITLE__</h1>
<div class="meta" id="meta"></div>
<div class="controls">
  <label for="layer">Layer:</label>
  <select id="layer"></select>
  <span class="legend">0 heads global <span class="bar"></span> <span id="legend-max"></span></span>
</div>
<div id="text"></div>
<script type="application/json" id="routing-data">__DATA__</script>
<script>
(function () {
  const data = JSON.parse(document.getElementById("routing-data").textContent);
  const select = document.getElementById("layer");
  const text = document.getElementById("text");
  const nLayers = data.global_heads.length;
  const allLayers = data.tokens.map((_, t) => data.global_heads.reduce((sum, row) => sum + row[t], 0));
  document.getElementById("meta").textContent = data.subtitle;
  const add = (value, label) => { const o = document.createElement("option"); o.value = value; o.textContent = label; select.appendChild(o); };
  add("all", "all layers");
  data.layer_names.forEach((name, i) => add(String(i), name));
  const spans = data.tokens.map((token) => {
    const span = document.createElement("span");
    span.textContent = token;
    text.appendChild(span);
    return span;
  });
  function render() {
    const all = select.value === "all";
    const counts = all ? allLayers : data.global_heads[Number(select.value)];
    const max = all ? data.num_heads * nLayers : data.num_heads;
    document.getElementById("legend-max").textContent = max + " heads global";
    spans.forEach((span, t) => {
      const share = counts[t] / max;
      span.style.backgroundColor = "rgba(214,39,40," + share.toFixed(3) + ")";
      span.style.color = share > 0.6 ? "#fff" : "";
      span.title = "token " + t + ": " + counts[t] + " / " + max + " heads global (" + (100 * share).toFixed(1) + "%)";
    });
  }
  const requested = new URLSearchParams(location.hash.slice(1)).get("layer");
  if (requested !== null && Array.from(select.options).some((o) => o.value === requested)) select.value = requested;
  select.addEventListener("change", () => { history.replaceState(null, "", "#layer=" + select.value); render(); });
  render();
})();
</script>
</body>
</html>
"""


def write_token_view(
    tokens: Sequence[str],
    routes: Tensor,
    path: str | Path,
    *,
    layer_names: Sequence[str] | None = None,
    title: str = "Where AHA attends globally",
    subtitle: str = "",
) -> Path:
    """Write the HTML token view of one text.

    Args:
        tokens: the decoded text of each token, in order (``S`` entries; whitespace kept).
        routes: hard routes ``[num_layers, num_heads, S]``, True = global (full causal attention).
        path: the ``.html`` file to write.
        layer_names: label of each layer in the selector (default ``"layer 0"``, ``"layer 1"``, ...).
        subtitle: one line of context shown under the title (model, window, overall global fraction).

    Returns:
        the written path.
    """
    if routes.dim() != 3 or routes.shape[-1] != len(tokens):
        raise ValueError(
            f"routes must be [num_layers, num_heads, {len(tokens)}] (one column per token), got {tuple(routes.shape)}"
        )
    num_layers, num_heads, _ = routes.shape
    names = list(layer_names) if layer_names is not None else [f"layer {i}" for i in range(num_layers)]
    if len(names) != num_layers:
        raise ValueError(f"got {len(names)} layer names for {num_layers} layers")
    data = {
        "tokens": list(tokens),
        "global_heads": routes.bool().sum(dim=1).tolist(),
        "num_heads": num_heads,
        "layer_names": names,
        "subtitle": subtitle,
    }
    # No "<" may reach the page inside the JSON: "</script" would close the element early and
    # "<!--" would switch the HTML parser into an escaped state that swallows the rest of the page.
    payload = json.dumps(data, ensure_ascii=False).replace("<", "\\u003c")
    page = _PAGE.replace("__TITLE__", html.escape(title)).replace("__DATA__", payload)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
