"""`nfdm-de train`'s settings: a TOML file and flags become a typed `TrainConfig`.

Resolution order (later wins): built-in defaults (or, with --resume, the run's stored config),
then the `--config` TOML file, then the flags given on the command line.
"""

import os
import tomllib
from pathlib import Path
from typing import Any


def read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist.")
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ValueError(f"cannot read config file {str(path)!r}: {error}") from None
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if isinstance(value, dict) and name in ("model", "optim", "train"):
            for inner, inner_value in value.items():
                flat[inner.replace("-", "_")] = inner_value
        else:
            flat[name] = value
    import nfdm_de as nd

    known = set(nd.FLAT_SETTINGS) | {"run_dir"}
    unknown = sorted(set(flat) - known)
    if unknown:
        raise ValueError(
            f"config file {str(path)!r}: unknown key(s) {unknown}; expected some of "
            f"{sorted(known)}."
        )
    return flat


def resolve(base, settings: dict[str, Any]):
    """`base` TrainConfig with the flat `settings` applied (a data path made absolute)."""
    import nfdm_de as nd

    enums = {
        "forward": nd.ForwardChoice,
        "volatility": nd.VolatilityChoice,
        "schedule": nd.ScheduleChoice,
        "forward_anchor": nd.AnchorChoice,
        "predictor_skip": nd.PredictorSkipChoice,
        "likelihood_trace": nd.TraceChoice,
    }
    for name, enum_type in enums.items():
        if name in settings and not isinstance(settings[name], enum_type):
            value = settings[name]
            try:
                settings = {**settings, name: enum_type(value)}
            except ValueError:
                choices = ", ".join(m.value for m in enum_type)
                raise ValueError(f"unknown {name} {value!r}; expected one of: {choices}.") from None
    for field in ("data", "source"):
        data = settings.get(field)
        if isinstance(data, str) and not nd.is_dataset_name(data):
            if nd.is_file_reference(data):
                settings = {**settings, field: os.path.abspath(data)}
            else:
                nd.get_dataset(data)  # raises the "unknown dataset" message
    return nd.update_config(base, settings)
