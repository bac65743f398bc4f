"""Serve AHA models over an OpenAI-compatible HTTP API (``aha serve``), on transformers' serving stack.

Needs the ``serve`` extra (FastAPI, uvicorn, the OpenAI client, the Prometheus client):
``pip install 'aha-attention[serve]'``. See ``docs/serving.md``.
"""

from aha.serving.server import ServeSettings, serve

__all__ = ["ServeSettings", "serve"]
