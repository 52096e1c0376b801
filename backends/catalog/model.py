"""The catalog's data model: installable engines, their versions and, per version, one install recipe for
each hardware variant.

A catalog entry is data that makes the daemon fetch and build programs, so each field is as narrow as the
installers need: release numbers are digits and dots, CMake options a fixed `-DNAME=VALUE` shape, pip
requirements exact `name==version` pins (no URLs, paths, extras that pull arbitrary indexes, or options),
binaries absolute paths. Anything else is refused with the field named.
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import PurePosixPath
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ENGINE_NAME = r"^[a-z0-9][a-z0-9._-]{0,47}$"
VERSION = r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,31}$"
_CMAKE_OPTION = re.compile(r"^-D[A-Z][A-Z0-9_]{0,63}=[A-Za-z0-9_.;-]{0,64}$")
_PIP_PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,99})(?:\[(?P<extras>[a-z0-9_,-]{1,100})\])?"
                      r"==(?P<version>[0-9][0-9A-Za-z.+!-]{0,31})$")


class Variant(StrEnum):
    """Builds of one engine version for one kind of hardware."""

    CPU = "cpu"
    CUDA12 = "cuda12"
    CUDA13 = "cuda13"
    ROCM = "rocm"
    VULKAN = "vulkan"
    METAL = "metal"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceBuild(_Strict):
    """Build the engine from a source release with CMake options on top of the engine's base options; the
    registered engine of the entry's name does the build (llama.cpp: a llama-cpp-python release, whose
    vendored tree gives llama-server; backends/llamacpp/install.py)."""

    kind: Literal["source-build"]
    source_version: str = Field(pattern=r"^[0-9]{1,4}(\.[0-9]{1,4}){1,3}$")
    cmake_options: tuple[str, ...] = ()

    @field_validator("cmake_options")
    @classmethod
    def _options(cls, options: tuple[str, ...]) -> tuple[str, ...]:
        for i, option in enumerate(options):
            if not _CMAKE_OPTION.fullmatch(option):
                raise ValueError(f"[{i}] {option!r}: a CMake option is -DNAME=VALUE (letters, digits, _.;-)")
        return options


class PipPlan(_Strict):
    """pip-install exact pins into a private virtual environment under the cache."""

    kind: Literal["pip"]
    packages: tuple[str, ...] = Field(min_length=1, max_length=32)
    # For pip's build of an sdist: CMake options only (llama-cpp-python reads CMAKE_ARGS; `-DLLAMA_BUILD=OFF`
    # skips compiling llama.cpp when the engine is pointed at an existing build's libraries).
    build_environment: dict[Literal["CMAKE_ARGS"], str] = Field(default_factory=dict)
    # A module imported to check the install.
    check_module: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")

    @field_validator("build_environment")
    @classmethod
    def _cmake_args(cls, env: dict[str, str]) -> dict[str, str]:
        for key, value in env.items():
            for option in value.split():
                if not _CMAKE_OPTION.fullmatch(option):
                    raise ValueError(f"{key}: {option!r}: CMake options are -DNAME=VALUE (letters, digits, _.;-)")
        return env

    @field_validator("packages")
    @classmethod
    def _pins(cls, packages: tuple[str, ...]) -> tuple[str, ...]:
        for i, spec in enumerate(packages):
            if not _PIP_PIN.fullmatch(spec):
                raise ValueError(f"[{i}] {spec!r}: a package is an exact pin NAME==VERSION (or NAME[extra]==VERSION); "
                                 "no URLs, paths, ranges or pip options")
        return packages


class ExistingBinary(_Strict):
    """A program the operator installs; the catalog only checks it is there."""

    kind: Literal["binary"]
    path: str

    @field_validator("path")
    @classmethod
    def _absolute(cls, path: str) -> str:
        p = PurePosixPath(path)
        if not p.is_absolute() or ".." in p.parts or "\0" in path:
            raise ValueError(f"{path!r}: an existing binary is an absolute path without '..'")
        return path


Recipe = Annotated[SourceBuild | PipPlan | ExistingBinary, Field(discriminator="kind")]


class CatalogVersion(_Strict):
    description: str = Field(default="", max_length=500)
    variants: dict[Variant, Recipe] = Field(min_length=1)


class CatalogEngine(_Strict):
    name: str = Field(pattern=ENGINE_NAME)
    description: str = Field(default="", max_length=500)
    default_version: str | None = None
    versions: dict[Annotated[str, Field(pattern=VERSION)], CatalogVersion] = Field(min_length=1)

    @model_validator(mode="after")
    def _default(self) -> CatalogEngine:
        if self.default_version is not None and self.default_version not in self.versions:
            raise ValueError(f"default_version {self.default_version!r} is not one of the versions "
                             f"({', '.join(self.versions)})")
        return self

    @property
    def newest(self) -> str:
        """The version `upgrade` goes to: the default one, else the highest."""
        return self.default_version or max(self.versions, key=version_order)


class Catalog(_Strict):
    engines: list[CatalogEngine] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> Catalog:
        seen: set[str] = set()
        for i, engine in enumerate(self.engines):
            if engine.name in seen:
                raise ValueError(f"engines[{i}].name: {engine.name!r} is listed twice")
            seen.add(engine.name)
        return self

    def engine(self, name: str) -> CatalogEngine | None:
        return next((e for e in self.engines if e.name == name), None)


def version_order(version: str) -> tuple[tuple[int, str], ...]:
    """Numeric parts compare as numbers (0.3.10 after 0.3.9), others as text after any number."""
    return tuple((int(p), "") if p.isdigit() else (1 << 30, p) for p in re.split(r"[.+_-]", version))
