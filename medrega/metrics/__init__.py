"""Scoring: region-aligned evaluation, text, report and answer metrics, and their breakdowns."""
