"""Self-contained HTML views of what the tools made (no CDN, no network; the data is in the page)."""

from auto_model.viewer.tree import tree_html, write_tree_html

__all__ = ["tree_html", "write_tree_html"]
