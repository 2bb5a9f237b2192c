"""Helpers for the end-to-end tests with the real go, pip and npm clients."""
