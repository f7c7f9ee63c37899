"""Typed configuration that rejects unknown keys and round-trips through JSON.

Every config in the project derives from :class:`StrictModel`: a misspelt key is an error, never
a silently ignored setting. Configs are frozen so a running process cannot drift from the file
it was started with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

ConfigT = TypeVar("ConfigT", bound="StrictModel")


class ConfigError(ValueError):
    """A configuration file is missing, unreadable or does not match its schema."""


class StrictModel(BaseModel):
    """Base of every config: unknown keys are rejected, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls: type[ConfigT], text: str, source: str = "<string>") -> ConfigT:
        try:
            return cls.model_validate_json(text)
        except ValidationError as error:
            raise ConfigError(f"{source}: {describe(error)}") from error

    @classmethod
    def load(cls: type[ConfigT], path: str | Path) -> ConfigT:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except IsADirectoryError as error:
            raise ConfigError(f"{path}: a folder, not a JSON file") from error
        except OSError as error:
            raise ConfigError(f"{path}: cannot read ({error.strerror})") from error
        except UnicodeDecodeError as error:
            byte = error.object[error.start]
            raise ConfigError(
                f"{path}: not UTF-8 text, so not JSON (byte {error.start} is {byte:#04x})"
            ) from error
        try:
            json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}: not valid JSON ({error})") from error
        return cls.from_json(text, source=str(path))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n", encoding="utf-8")


def describe(error: ValidationError) -> str:
    """Each problem of a config as ``key.path: what is wrong (got VALUE)``, one after another:
    the words a person editing the file needs, without pydantic's links."""
    problems = []
    for problem in error.errors(include_url=False):
        where = ".".join(str(part) for part in problem["loc"]) or "the file"
        text = f"{where}: {problem['msg']}"
        if problem["type"] not in ("missing", "extra_forbidden") and not isinstance(
            problem.get("input"), dict
        ):
            text += f" (got {problem.get('input')!r})"
        problems.append(text)
    return "; ".join(problems)
