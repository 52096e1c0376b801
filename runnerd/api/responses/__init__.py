"""OpenAI's Responses API (routes.py): relayed or translated (translate.py), with the daemon's own stored
responses (store.py)."""

from runnerd.api.responses.routes import add_routes

__all__ = ["add_routes"]
