"""Engines defined by a manifest (YAML or TOML): run template, versions, readiness, capabilities,
flag policy and memory estimate as data. See README, "Adding an engine"."""

from backends.manifest.backend import ManifestBackend, backend_class
from backends.manifest.errors import ManifestError
from backends.manifest.model import NAME_SUFFIX, EngineManifest
from backends.manifest.source import Format, format_of, parse_manifest

__all__ = ["NAME_SUFFIX", "EngineManifest", "Format", "ManifestBackend", "ManifestError", "backend_class",
           "format_of", "parse_manifest"]
