"""``auto-model serve``: an OpenAI-compatible server that applies a model's alignment to every request.

See :func:`auto_model.server.app.create_app`.
"""

from __future__ import annotations

from auto_model.server.app import CLIENT_SYSTEM_MODES, ServerLimits, create_app
from auto_model.server.upstream import Upstream

__all__ = ["CLIENT_SYSTEM_MODES", "ServerLimits", "Upstream", "create_app"]
