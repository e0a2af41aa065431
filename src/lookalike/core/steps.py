"""A re-ranking step: a re-ranker's name and its parameters, in the YAML forms a config's `rerank:` list takes."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_serializer, model_validator

from lookalike.core.errors import ConfigError


class RerankStep(BaseModel):
    """One stage of the re-ranking chain: a registered re-ranker's name and its parameters. Written in YAML as a bare
    name (`icfrr`), `{name: icfrr, kg: 10}` or `{icfrr: {kg: 10}}`; dumped as the first two."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    params: dict[str, Any] = {}

    @model_validator(mode="before")
    @classmethod
    def _from_yaml(cls, step: Any) -> Any:
        """The YAML forms as name + params (a RerankStep or its fields pass through)."""
        if isinstance(step, RerankStep) or (isinstance(step, dict) and set(step) == {"name", "params"}):
            return step
        name, params = step_fields(step)
        return {"name": name, "params": params}

    @model_serializer
    def _to_yaml(self) -> str | dict[str, Any]:
        """The YAML form: the bare name, or {name: ..., parameter: value, ...}."""
        return {"name": self.name, **self.params} if self.params else self.name

    @classmethod
    def parse(cls, step: Any, position: int = 0) -> RerankStep:
        """A step of a config's `rerank:` list (its name is checked against the registry by the Config that holds it).

        Args:
            step: a RerankStep, a name, {name: ..., parameter: value} or {name: {parameter: value}}.
            position: its index in the chain, named by errors ("rerank[1]").

        Returns:
            The typed step; a bad shape is one ConfigError naming rerank[position].
        """
        if isinstance(step, RerankStep):
            name, params = step.name, dict(step.params)
        else:
            name, params = step_fields(step, position)
        return cls(name=name, params=params)


def step_fields(step: Any, position: int = 0) -> tuple[str, dict[str, Any]]:
    """A YAML step's name and parameters: "icfrr", {"name": "icfrr", "kg": 10} or {"icfrr": {"kg": 10}}."""
    if isinstance(step, str):
        return step, {}
    if isinstance(step, dict) and "name" in step:
        return str(step["name"]), {str(k): v for k, v in step.items() if k != "name"}
    if isinstance(step, dict) and len(step) == 1 and isinstance(next(iter(step.values())) or {}, dict):
        ((name, params),) = step.items()
        return str(name), {str(k): v for k, v in (params or {}).items()}
    raise ConfigError(f"rerank[{position}]: expected a re-ranker name or {{name: ..., parameter: value}}, got {step!r}")
