"""Anthropic's Messages API (routes.py), relayed or translated (translate.py)."""

from runnerd.api.anthropic.routes import PREFIXES, add_routes

__all__ = ["PREFIXES", "add_routes"]
