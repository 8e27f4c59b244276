"""The Optuna samplers a study may name, and the check of their YAML options against each sampler's own
signature (names, types, signs), done before any study folder is written."""

from __future__ import annotations

import inspect
import json
from typing import Any

from pipelines.errors import ConfigError, unknown_name

__all__ = ["SAMPLERS", "DEFAULT_OPTIONS", "check_sampler", "sampler_class", "sampler_options"]

SAMPLERS: tuple[str, ...] = ("tpe", "nsga2", "gp", "random")
# Options a sampler gets unless the space sets them: TPE as Optuna advises for dependent parameters and
# parallel workers; at equal wall time on BloodMNIST it reached the highest mean hypervolume of the four
# (results/benchmarks/samplers.md).
DEFAULT_OPTIONS: dict[str, dict] = {
    "tpe": {"multivariate": True, "constant_liar": True},
    "nsga2": {},
    "gp": {},
    "random": {},
}


def sampler_options(name: str, options: dict) -> dict:
    """The keyword arguments of sampler ``name``: its defaults, overridden by the space's ``options``."""
    return {**DEFAULT_OPTIONS.get(name, {}), **options}


def sampler_class(name: str) -> type:
    """The Optuna sampler class of a name in :data:`SAMPLERS`."""
    import optuna

    classes = {
        "tpe": optuna.samplers.TPESampler,
        "nsga2": optuna.samplers.NSGAIISampler,
        "gp": optuna.samplers.GPSampler,
        "random": optuna.samplers.RandomSampler,
    }
    if name not in classes:
        raise unknown_name("study.sampler.name", name, SAMPLERS)
    return classes[name]


_YAML_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "None": type(None)}
_YAML_WORDS = {
    int: "a whole number",
    float: "a number",
    bool: "true or false",
    str: "a string",
    type(None): "null",
}


def _yaml_types(annotation: Any) -> set[type]:
    """The types a YAML value can have among those an annotation (``'int | None'``) names."""
    names = [part.strip() for part in str(getattr(annotation, "__name__", annotation)).split("|")]
    return {_YAML_TYPES[name] for name in names if name in _YAML_TYPES}


_POSITIVE_OPTIONS = ("n_ei_candidates", "population_size", "prior_weight")  # the others may be 0


def check_sampler(name: str, seed: int | None, options: dict, check_seed) -> None:
    """Options are keyword arguments of the sampler class, of the types its signature names, and the
    sampler accepts them: checked by building it here, before a study folder is written."""
    cls = sampler_class(name)
    if seed is not None:
        check_seed("study.sampler.seed", seed)
    parameters = {
        name: parameter
        for name, parameter in inspect.signature(cls.__init__).parameters.items()
        if name not in ("self", "seed") and parameter.kind is not inspect.Parameter.VAR_KEYWORD
    }
    settable = sorted(name for name in parameters if _yaml_types(parameters[name].annotation) - {type(None)})
    for key, value in options.items():
        path = f"study.sampler.options.{key}"
        if key == "seed":
            raise ConfigError(f"{path}: set the seed as study.sampler.seed, not as an option.")
        if not settable:
            raise ConfigError(
                f"{path}: {cls.__name__} ({name}) takes no options; remove study.sampler.options."
            )
        if key not in parameters:
            raise ConfigError(
                f"{path}: unknown option of {cls.__name__} ({name}). Valid options: {', '.join(settable)}."
            )
        annotation = parameters[key].annotation
        allowed = _yaml_types(annotation)
        if key not in settable:
            raise ConfigError(
                f"{path}: {cls.__name__} takes a Python object ({annotation}) here, which a YAML file cannot "
                f"give. Remove the option (the sampler's default is used); options a file can set: "
                f"{', '.join(settable)}."
            )
        fits = any(
            (kind is float and isinstance(value, int | float) and not isinstance(value, bool))
            or (kind is int and isinstance(value, int) and not isinstance(value, bool))
            or (kind not in (int, float) and isinstance(value, kind))
            for kind in allowed
        )
        if not fits:
            written = " or ".join(word for kind, word in _YAML_WORDS.items() if kind in allowed)
            raise ConfigError(
                f"{path}: expected {written}, got {value!r}. Write e.g. "
                f"`{key}: {json.dumps(parameters[key].default)}` (the default)."
            )
        if isinstance(value, int | float) and not isinstance(value, bool):
            positive = key in _POSITIVE_OPTIONS
            if value < 0 or (positive and value == 0):
                raise ConfigError(
                    f"{path}: {value} must be {'> 0' if positive else '>= 0'} (default {json.dumps(parameters[key].default)})."
                )
    try:
        cls(seed=seed, **options)
    except (TypeError, ValueError) as error:
        raise ConfigError(
            f"study.sampler.options: {options} rejected by {cls.__name__}: {error} Fix that option or remove it."
        ) from None
