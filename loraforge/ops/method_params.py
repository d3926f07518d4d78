"""Typed method parameters: each merge or LoRA method's `Params` model checks `--param` and recipe values."""

from __future__ import annotations

from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, ValidationError

from loraforge.errors import ConfigError


class MethodParams(BaseModel):
    """Base of a method's `Params`: unknown names refused; strict, so `true` or "0.3" is not a number."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def method_params(kind: str, name: str, method: Any, given: Mapping[str, Any]) -> dict[str, Any]:
    """All parameters of `method` (defaults filled in), checked by its `Params` model.

    A plugin without a `Params` model only has the names checked against its `params` defaults.
    """
    model = getattr(method, "Params", None)
    defaults = dict(getattr(method, "params", None) or {})
    if model is None:
        unknown = sorted(set(given) - set(defaults))
        if unknown:
            raise ConfigError(f"{kind} {name} has no parameter {unknown[0]!r} "
                              f"(its parameters: {', '.join(defaults) or 'none'})")
        return {**defaults, **given}
    try:
        return model.model_validate(dict(given)).model_dump()
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        key = str(error["loc"][0]) if error["loc"] else ""
        if error["type"] == "extra_forbidden":
            problem = ConfigError(f"{kind} {name} has no parameter {key!r} "
                                  f"(its parameters: {', '.join(model.model_fields) or 'none'})")
        else:
            field = model.model_fields[key]
            about = f" ({field.description})" if field.description else ""
            problem = ConfigError(f"invalid parameter {key}={given[key]!r} for {kind} {name}: "
                                  f"{error['msg'].lower()}{about}; use e.g. {key}={field.default}")
        problem.param = key  # lets a recipe error point at the parameter's line
        raise problem from None
