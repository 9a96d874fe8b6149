"""Self-contained HTML views of what the tools made (no CDN, no network; the data is in the page)."""

from auto_model.viewer.report import report_html, write_report_html
from auto_model.viewer.tree import tree_html, write_tree_html

__all__ = ["report_html", "tree_html", "write_report_html", "write_tree_html"]
