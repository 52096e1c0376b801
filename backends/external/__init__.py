"""OpenAI-compatible endpoints runnerd does not start: a profile per kind of runtime, and the client
that discovers an endpoint's models and checks its health. Nothing here knows the daemon."""

from backends.external.endpoint import Discovery, ExternalEndpoint, ExternalError, UpstreamSpec, read_at_most
from backends.external.profiles import KINDS, KindProfile, Listing, profile

__all__ = ["KINDS", "Discovery", "ExternalEndpoint", "ExternalError", "KindProfile", "Listing", "UpstreamSpec",
           "profile", "read_at_most"]
