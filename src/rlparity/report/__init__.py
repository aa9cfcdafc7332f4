"""Conformance records and benchmark results -> the history store -> one static HTML page comparing environments,
engine versions and runs over time, regressions first."""

from rlparity.report.dashboard import build_dashboard

__all__ = ["build_dashboard"]
