"""Shared builders for tests (not fixtures: plain functions the test modules call)."""
