"""The catalog as this daemon sees it: the shipped catalog with the operator's on top, what of it this host
can install (its variant, resolved from the inventory), what is installed, the upgrades, and running an
install or removal of one entry."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

from pydantic import BaseModel, Field

from backends.base import Backend, InstallError, ProgressCallback
from backends.catalog import Catalog, CatalogError, PipPlan, SourceBuild, Variant, parse_catalog, resolve
from backends.catalog.model import CatalogEngine, Recipe, version_order
from backends.catalog.pip_env import env_python, env_root, install_env, installed_envs, remove_env

Kind = Literal["source-build", "pip", "binary"]


class CatalogItem(BaseModel):
    engine: str
    version: str
    default: bool = Field(description="the version `upgrade` goes to")
    variant: Variant = Field(description="the variant this host would install (meta resolution)")
    variants: list[Variant] = Field(description="every variant the catalog offers for this version")
    kind: Kind
    installed: bool
    description: str = ""


class Upgrade(BaseModel):
    engine: str
    installed: list[str]
    available: str
    variant: Variant


def _over(base: Catalog, top: Catalog) -> Catalog:
    """`base` with `top`'s engines added; one of `top` replaces the engine of its name in `base`."""
    names = {e.name for e in top.engines}
    return Catalog(engines=[*(e for e in base.engines if e.name not in names), *top.engines])


def load_catalog(shipped: Catalog, operator_file: Path | None, fetched: Catalog | None = None) -> Catalog:
    """Blocking (reads the operator's file). Layers, each replacing the engines of its names in those below:
    the shipped catalog, the one fetched from `catalog_url`, the operator's file."""
    catalog = shipped if fetched is None else _over(shipped, fetched)
    if operator_file is None:
        return catalog
    try:
        text = operator_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CatalogError(f"{operator_file}: cannot read: {exc}") from exc
    return _over(catalog, parse_catalog(text, str(operator_file)))


@runtime_checkable
class SourceBuilds(Protocol):
    """A registered engine that builds versions of itself from source beside each other."""

    def build_problem(self, options: Sequence[str]) -> str | None: ...
    def installed_versions(self) -> list[str]: ...
    async def install_version(self, version: str, progress: ProgressCallback | None = None) -> None: ...


def _builder(backends: Mapping[str, Backend], engine: str, recipe: SourceBuild) -> tuple[SourceBuilds | None, str]:
    """The engine that carries out a source build, or why none can here."""
    backend: object = backends.get(engine)  # any registered engine may offer it, whatever its class
    if not isinstance(backend, SourceBuilds):
        return None, f"no registered engine {engine!r} builds itself from source in this daemon"
    problem = backend.build_problem(recipe.cmake_options)
    return (None, problem) if problem else (backend, "")


def is_installed(cache_dir: Path, backends: Mapping[str, Backend], engine: str, version: str, variant: Variant,
                 recipe: Recipe) -> bool:
    """Blocking (lists directories, may stat a binary)."""
    if isinstance(recipe, SourceBuild):
        builder, _ = _builder(backends, engine, recipe)
        return builder is not None and recipe.source_version in builder.installed_versions()
    if isinstance(recipe, PipPlan):
        return any(e == engine and v == version and var == variant for e, v, var, _ in installed_envs(cache_dir))
    return os.path.isfile(recipe.path) and os.access(recipe.path, os.X_OK)


def host_items(catalog: Catalog, preferred: Sequence[Variant], cache_dir: Path,
               backends: Mapping[str, Backend]) -> list[CatalogItem]:
    """Blocking: every catalog version this host can install, with the variant it would get."""
    items = []
    for engine in catalog.engines:
        for version, spec in sorted(engine.versions.items(), key=lambda kv: version_order(kv[0]), reverse=True):
            chosen = resolve(spec, preferred)
            if chosen is None:
                continue
            variant, recipe = chosen
            items.append(CatalogItem(
                engine=engine.name, version=version, default=version == engine.newest, variant=variant,
                variants=sorted(spec.variants), kind=recipe.kind, description=spec.description or engine.description,
                installed=is_installed(cache_dir, backends, engine.name, version, variant, recipe)))
    return items


def upgrades(items: Sequence[CatalogItem]) -> list[Upgrade]:
    """Engines with a version installed whose catalog default is newer than every installed one."""
    found = []
    for engine in dict.fromkeys(i.engine for i in items):
        mine = [i for i in items if i.engine == engine]
        installed = sorted((i.version for i in mine if i.installed), key=version_order)
        target = next((i for i in mine if i.default), None)
        if installed and target is not None and not target.installed \
                and version_order(target.version) > version_order(installed[-1]):
            found.append(Upgrade(engine=engine, installed=installed, available=target.version, variant=target.variant))
    return found


def pick(catalog: Catalog, preferred: Sequence[Variant], engine: str, version: str | None,
         variant: Variant | None) -> tuple[CatalogEngine, str, Variant, Recipe]:
    """The entry an install names: its version (default: the catalog's), its variant (default: this host's)."""
    entry = catalog.engine(engine)
    if entry is None:
        known = ", ".join(e.name for e in catalog.engines)
        raise CatalogError(f"engine: unknown backend {engine!r}: the catalog offers {known}")
    version = version or entry.newest
    spec = entry.versions.get(version)
    if spec is None:
        raise CatalogError(f"version: {engine} {version} is not in the catalog (offered: {', '.join(entry.versions)})")
    if variant is not None:
        if variant not in preferred:
            raise CatalogError(f"variant: this host runs {', '.join(preferred)}, not {variant}")
        recipe = spec.variants.get(variant)
        if recipe is None:
            raise CatalogError(f"variant: {engine} {version} has no {variant} build (offered: "
                               f"{', '.join(spec.variants)})")
        return entry, version, variant, recipe
    chosen = resolve(spec, preferred)
    if chosen is None:
        raise CatalogError(f"variant: {engine} {version} offers {', '.join(spec.variants)}; this host runs "
                           f"{', '.join(preferred)}")
    return entry, version, chosen[0], chosen[1]


async def install(cache_dir: Path, backends: Mapping[str, Backend], engine: str, version: str, variant: Variant,
                  recipe: Recipe, progress: ProgressCallback | None = None) -> str:
    """Carry out one catalog entry's recipe; a line saying what is installed where."""
    if isinstance(recipe, SourceBuild):
        builder, problem = _builder(backends, engine, recipe)
        if builder is None:
            raise InstallError(f"{engine} {version} ({variant}): {problem}")
        await builder.install_version(recipe.source_version, progress)
        return f"installed {engine}@{recipe.source_version} ({variant})"
    if isinstance(recipe, PipPlan):
        python = await install_env(env_root(cache_dir, engine, version, variant), recipe, progress)
        return f"installed {engine} {version} ({variant}) in {python.parent.parent}"
    if not await asyncio.to_thread(lambda: os.path.isfile(recipe.path) and os.access(recipe.path, os.X_OK)):
        raise InstallError(f"{engine} {version} ({variant}) is the existing binary {recipe.path}, which is not an "
                           "executable file here: install it first")
    return f"{engine} {version} ({variant}) is the existing binary {recipe.path}"


def env_users(backends: Mapping[str, Backend], root: Path) -> list[str]:
    """Manifest engines whose versions run a program from inside a private environment."""
    from backends.manifest import ManifestBackend

    inside = str(root.resolve()) + os.sep
    users = []
    for name, backend in backends.items():
        if isinstance(backend, ManifestBackend):
            commands = [v.command[0] for v in backend.manifest.versions.values()]
            if any(os.path.realpath(c).startswith(inside) or c.startswith(str(root) + os.sep) for c in commands):
                users.append(name)
    return sorted(users)


def pip_env_python(cache_dir: Path, engine: str, version: str, variant: Variant) -> Path:
    return env_python(env_root(cache_dir, engine, version, variant))


async def remove_pip_env(cache_dir: Path, engine: str, version: str, variant: Variant) -> None:
    await asyncio.to_thread(remove_env, env_root(cache_dir, engine, version, variant))
