"""Backorder forecasting: which SKUs are about to go on backorder, how likely, and why."""

__version__ = "0.1.0"
