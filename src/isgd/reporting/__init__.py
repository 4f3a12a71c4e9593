"""Figures and markdown reports of run and comparison directories."""
