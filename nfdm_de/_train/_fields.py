"""Checks and conversions of configuration values: from JSON, TOML and the command line to
typed fields, and back."""

import dataclasses
import enum


def _is_real(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_positive_int(name: str, value) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        raise ValueError(f"`{name}` must be a positive integer; got {value!r}.")


def _check_enum(name: str, value, enum_type) -> None:
    if not isinstance(value, enum_type):
        choices = ", ".join(m.value for m in enum_type)
        raise ValueError(f"`{name}` must be a {enum_type.__name__} ({choices}); got {value!r}.")


def _to_jsonable(obj):
    if isinstance(obj, dict):
        return {k: _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, enum.Enum):
        return obj.value
    return obj


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _coerce(cls, name: str, value):
    """A value from JSON/TOML/the command line, as the type of field `name` of `cls`: ints are
    accepted for floats, strings for Enums; anything else of the wrong type is a ValueError."""
    target = {f.name: f.type for f in dataclasses.fields(cls)}[name]
    if isinstance(target, type) and issubclass(target, enum.Enum):
        if isinstance(value, target):
            return value
        try:
            return target(value)
        except ValueError:
            choices = ", ".join(m.value for m in target)
            raise ValueError(f"unknown {name} {value!r}; expected one of: {choices}.") from None
    if target is float and _is_real(value):
        return float(value)
    if target is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if target is str and isinstance(value, str):
        return value
    if target == int | None and (value is None or isinstance(value, int)):
        if not isinstance(value, bool):
            return value
    if target == int | None:
        raise ValueError(f"`{name}` must be a positive integer or None; got {value!r}.")
    if target == float | None and (value is None or _is_real(value)):
        return None if value is None else float(value)
    if target == float | None:
        raise ValueError(f"`{name}` must be a number or None (automatic); got {value!r}.")
    if target == bool | None:
        if value is None or isinstance(value, bool):
            return value
        raise ValueError(f"`{name}` must be true, false or None (automatic); got {value!r}.")
    if target in (int, float, str):
        raise ValueError(f"`{name}` must be {target.__name__}; got {value!r}.")
    return value


def _check_known(cls, d: dict, where: str) -> None:
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(
            f"unknown config key(s) {unknown}{f' in {where!r}' if where else ''}; "
            f"expected some of {sorted(fields)}."
        )


# Stored-config keys that a run directory may lack, with the value that reproduces its model:
# a config without `predictor_residual` has a plain predictor MLP.
ABSENT_MEANS: dict[str, object] = {"predictor_residual": False}


def _dataclass_from_dict(cls, d: dict, where: str, **already):
    if not isinstance(d, dict):
        raise ValueError(f"config section '{where}' must be a table; got {d!r}.")
    _check_known(cls, d, where)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in ABSENT_MEANS.items() if k in names}
    kwargs.update(already)
    kwargs.update({name: _coerce(cls, name, value) for name, value in d.items()})
    missing = sorted({f.name for f in dataclasses.fields(cls)} - set(kwargs))
    if missing:
        raise ValueError(
            f"the stored config lacks {missing}{f' in {where!r}' if where else ''}: it was "
            "written by another version of nfdm-de; retrain the run with this one."
        )
    return cls(**kwargs)
