"""Conformance records and benchmark JSON -> one static HTML page comparing environments."""

from rlparity.report.dashboard import build_dashboard

__all__ = ["build_dashboard"]
