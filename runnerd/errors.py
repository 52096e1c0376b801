"""Errors the CLI reports as one line. Kept free of heavy imports: the CLI starts with this module."""

from __future__ import annotations


class ClientError(Exception):
    """The daemon could not be reached or answered with an error; the message says which."""
