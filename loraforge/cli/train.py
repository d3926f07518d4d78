"""`loraforge train METHOD`: one subcommand per registered trainer, its options generated from the config."""

from __future__ import annotations

import json
import types
import typing
from typing import Any, Literal

import click

from loraforge.errors import ConfigError


def _unwrap(annotation: Any) -> Any:
    """X for Optional[X] / X | None."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _option(name: str, field) -> click.Option:
    annotation = _unwrap(field.annotation)
    origin = typing.get_origin(annotation)
    flag = "--" + name.replace("_", "-")
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    flags = [flag, *extra.get("cli_aliases", [])]
    required = field.is_required()
    help_text = field.description or ""
    if not required:
        default = field.get_default(call_default_factory=True)
        if default not in (None, [], {}, ""):
            help_text += f"  [default: {default if not isinstance(default, list) else ', '.join(map(str, default))}]"
    kwargs: dict[str, Any] = dict(help=help_text, required=required, default=None)
    if annotation is bool:
        return click.Option([f"{flag}/--no-{flag[2:]}"], **kwargs)
    if origin is Literal:
        kwargs["type"] = click.Choice([str(a) for a in typing.get_args(annotation)])
    elif origin is list:
        kwargs.update(multiple=True, default=None)
        kwargs["help"] += "  (repeatable)"
    elif origin is tuple:
        args = typing.get_args(annotation)
        kwargs.update(nargs=len(args), type=args[0])
    elif annotation in (int, float, str):
        kwargs["type"] = annotation
    else:  # dicts and nested models: JSON text
        kwargs["type"] = str
        kwargs["metavar"] = "JSON"
    return click.Option([name, *flags], **kwargs)


def _values(config_class, params: dict[str, Any]) -> dict[str, Any]:
    values = {}
    for name, field in config_class.model_fields.items():
        value = params.get(name)
        if value is None or value == ():
            continue
        annotation = _unwrap(field.annotation)
        if isinstance(value, str) and annotation not in (str, int, float, bool) and typing.get_origin(annotation) not in (Literal,):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"--{name.replace('_', '-')} needs JSON ({exc.msg} at column {exc.colno})") from None
        values[name] = list(value) if isinstance(value, tuple) else value
    return values


def validate_config(config_class, values: dict[str, Any]):
    """The trainer's config, with pydantic's complaints turned into one-line ConfigErrors."""
    from pydantic import ValidationError

    try:
        return config_class.model_validate(values)
    except ValidationError as exc:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "config"
            parts.append(f"{where}: {err['msg']}")
        raise ConfigError("invalid training options: " + "; ".join(parts)) from None


def _summary(manifest) -> str:
    """Kind, rank and the run figures the trainer recorded (a plugin trainer may record none)."""
    metrics = manifest.metrics or {}
    parts = [manifest.kind]
    if manifest.adapter is not None:
        parts.append(f"rank {manifest.adapter.rank}")
    if metrics.get("steps") is not None:
        parts.append(f"{metrics['steps']} steps")
    if metrics.get("loss_last") is not None:
        parts.append(f"final loss {metrics['loss_last']:.4f}")
    if metrics.get("samples_per_s") is not None:
        parts.append(f"{metrics['samples_per_s']} samples/s")
    return ", ".join(parts)


def _command(method: str, info) -> click.Command:
    trainer_cls = info.obj
    config_class = trainer_cls.config_class

    def callback(name: str, resume: bool, as_json: bool, **params: Any) -> None:
        from loraforge.cli.output import echo_json, registry_from_ctx

        config = validate_config(config_class, _values(config_class, params))
        if getattr(config, "processes", 1) > 1:  # a plugin trainer outside SessionTrainer would ignore it
            from loraforge.train.distributed import check_processes

            check_processes(trainer_cls, config, method)
        registry = registry_from_ctx(click.get_current_context())
        manifests = trainer_cls().train(config, registry=registry, output=name, resume=resume,
                                        progress=None if not as_json else False)
        if as_json:
            echo_json([m.model_dump(mode="json") for m in manifests])
            return
        for m in manifests:
            click.echo(f"registered {m.ref} ({_summary(m)})")

    params = [
        click.Option(["--name", "-n"], required=True, help="Artifact name to register (a joint run adds -<adapter>)."),
        click.Option(["--resume"], is_flag=True, help="Continue from the run's last checkpoint."),
        click.Option(["--json", "as_json"], is_flag=True, help="Print the registered manifests as JSON."),
    ]
    params += [_option(n, f) for n, f in config_class.model_fields.items()]
    doc = (trainer_cls.__doc__ or "").strip().split("\n")[0]
    if info.reference_url:
        doc += f"  Reference: {info.reference_url}"
    return click.Command(method, callback=callback, params=params, help=doc,
                         context_settings={"help_option_names": ["-h", "--help"]})


class TrainGroup(click.Group):
    """Subcommands come from the TRAINERS plugin group, so installed trainers appear here too."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        from loraforge.plugins import TRAINERS

        return [n for n in TRAINERS.names() if hasattr(TRAINERS.get(n), "config_class")]

    def get_command(self, ctx: click.Context, name: str):
        from loraforge.plugins import TRAINERS

        if name not in TRAINERS:
            return None
        return _command(name, TRAINERS.info(name))


@click.group(cls=TrainGroup, context_settings={"help_option_names": ["-h", "--help"]})
def train() -> None:
    """Train adapters (LoRA, DreamBooth-LoRA, sliders, joint) and register them."""
