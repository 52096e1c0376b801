"""The engine catalog: what runnerd can install, per version and hardware variant (model.py), which variant
suits this host (variants.py), and the catalog shipped with runnerd (catalog.yaml)."""

from __future__ import annotations

from importlib import resources

import yaml
from pydantic import ValidationError

from backends.catalog.model import Catalog, CatalogEngine, ExistingBinary, PipPlan, SourceBuild, Variant
from backends.catalog.variants import host_variants, resolve

__all__ = ["MAX_CATALOG_BYTES", "Catalog", "CatalogEngine", "CatalogError", "ExistingBinary", "PipPlan", "SourceBuild",
           "Variant", "host_variants", "parse_catalog", "resolve", "shipped_catalog"]

MAX_CATALOG_BYTES = 1 << 20


class CatalogError(ValueError):
    """A catalog that fails its checks; the message names the field."""


def parse_catalog(text: str, source: str) -> Catalog:
    if len(text.encode()) > MAX_CATALOG_BYTES:
        raise CatalogError(f"{source}: larger than {MAX_CATALOG_BYTES} bytes")
    try:
        # Aliases let a small document expand into a huge one for the validator: a catalog needs none.
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                mark = event.start_mark
                raise CatalogError(f"{source}: line {mark.line + 1 if mark else '?'}: YAML aliases (*name) are not "
                                   "allowed in a catalog")
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CatalogError(f"{source}: not YAML: {exc}") from exc
    try:
        return Catalog.model_validate(data if data is not None else {})
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise CatalogError(f"{source}: {field}: {first['msg']}") from exc


def shipped_catalog() -> Catalog:
    text = resources.files("backends.catalog").joinpath("catalog.yaml").read_text(encoding="utf-8")
    return parse_catalog(text, "the shipped catalog")
