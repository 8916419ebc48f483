"""Settings files validated by pydantic (state/config_model.py): one style of error for every config.

Each config (engine settings of the three engine kinds, SLO classes, API keys, autoscaling knobs,
the app's ``args``) refuses an unknown key, a wrong type and an out-of-range value with the
caller's own exception type, naming the field by its path and saying what was expected.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.app import AppConfig
from cluster.autoscaling import SLOAutoscalingPolicy, SLOScalingConfigError, serve_autoscaling_config
from cluster.launcher import load_app_args
from replicas.echo_engine import EchoConfig
from replicas.engine_config import EngineConfig, EngineConfigError
from replicas.vllm_process import VLLMConfig
from router.auth import AccessConfigError, AccessPolicy
from router.slo import SLOClass, SLOConfigError, SLOPolicy

ROOT = Path(__file__).resolve().parents[1]
POLICY = {"default_class": "standard", "classes": [
    {"name": "interactive", "ttft_slo_ms": 300, "priority": 0},
    {"name": "standard", "ttft_slo_ms": 1000, "priority": 1}]}


def _slo(cls: int, key: str, value: Any) -> dict[str, Any]:  # noqa: ANN401
    classes = [dict(c) for c in POLICY["classes"]]
    classes[cls][key] = value
    return {**POLICY, "classes": classes}


def _field(exc: Exception) -> str:
    return exc.path if isinstance(exc, SLOConfigError) else exc.field


# (what parses, its input, the error type, the field path, the message after "path: ")
CASES: list[tuple[str, Callable[[Any], object], Any, type[Exception], str, str]] = [
    ("engine unknown", EngineConfig.from_dict, {"max_wait": 5}, EngineConfigError, "engine.max_wait",
     "unknown field (known: "),
    ("engine type", EngineConfig.from_dict, {"block_size": "16"}, EngineConfigError, "engine.block_size",
     "Input should be a valid integer, got '16'"),
    ("engine bool is no int", EngineConfig.from_dict, {"max_waiting": True}, EngineConfigError,
     "engine.max_waiting", "Input should be a valid integer, got True"),
    ("engine range", EngineConfig.from_dict, {"prefix_cache_share": 1.5}, EngineConfigError,
     "engine.prefix_cache_share", "Input should be less than or equal to 1, got 1.5"),
    ("engine choice", EngineConfig.from_dict, {"policy": "lifo"}, EngineConfigError, "engine.policy",
     "Input should be 'flowprefill', 'chunked' or 'fcfs', got 'lifo'"),
    ("engine not finite", EngineConfig.from_dict, {"alpha": float("nan")}, EngineConfigError, "engine.alpha",
     "Input should be a finite number, got nan"),
    ("vllm unknown", VLLMConfig.from_dict, {"block_size": 16}, EngineConfigError, "engine.block_size",
     "unknown field (known: "),
    ("vllm type", VLLMConfig.from_dict, {"extra_args": "--enforce-eager"}, EngineConfigError,
     "engine.extra_args", "Input should be a list, got str"),
    ("vllm range", VLLMConfig.from_dict, {"kv_cache_gib": 0}, EngineConfigError, "engine.kv_cache_gib",
     "Input should be greater than 0, got 0"),
    ("vllm across fields", VLLMConfig.from_dict, {"max_model_len": 1024}, EngineConfigError,
     "engine.profile_max_tokens", "must be below max_model_len (1024)"),
    ("echo unknown", EchoConfig.from_dict, {"temperature": 1}, EngineConfigError, "engine.temperature",
     "unknown field (known: decode_step_s, max_model_len, model, prefill_s_per_1k_tokens)"),
    ("echo range", EchoConfig.from_dict, {"decode_step_s": -0.1}, EngineConfigError, "engine.decode_step_s",
     "Input should be greater than or equal to 0, got -0.1"),
    ("slo unknown", SLOPolicy.from_dict, _slo(1, "deadline_ms", 5), SLOConfigError, "slo.classes[1].deadline_ms",
     "unknown field (known: name, priority, sheddable, tpot_slo_ms, ttft_slo_ms)"),
    ("slo type", SLOPolicy.from_dict, _slo(1, "ttft_slo_ms", "1s"), SLOConfigError, "slo.classes[1].ttft_slo_ms",
     "Input should be a valid number, got '1s'"),
    ("slo range", SLOPolicy.from_dict, _slo(1, "ttft_slo_ms", -5), SLOConfigError, "slo.classes[1].ttft_slo_ms",
     "Input should be greater than 0, got -5"),
    ("slo duplicate", SLOPolicy.from_dict, _slo(1, "name", "interactive"), SLOConfigError, "slo.classes[1].name",
     "duplicate class name 'interactive'"),
    ("slo default", SLOPolicy.from_dict, {**POLICY, "default_class": "gold"}, SLOConfigError, "slo.default_class",
     "must name one of the classes ['interactive', 'standard']"),
    ("autoscaling knob unknown", serve_autoscaling_config, {"policy": {"policy_kwargs": {"goal": 0.9}}},
     EngineConfigError, "args.autoscaling.policy.policy_kwargs.goal", "unknown field (known: attainment_goal, "),
    ("autoscaling knob type", serve_autoscaling_config, {"policy": {"policy_kwargs": {"min_samples": 2.5}}},
     EngineConfigError, "args.autoscaling.policy.policy_kwargs.min_samples",
     "Input should be a valid integer, got 2.5"),
    ("autoscaling knob range", serve_autoscaling_config, {"policy": {"policy_kwargs": {"target_utilization": 0}}},
     EngineConfigError, "args.autoscaling.policy.policy_kwargs.target_utilization",
     "Input should be greater than 0, got 0"),
    ("autoscaling serve field", serve_autoscaling_config, {"look_back_period_s": "long"}, EngineConfigError,
     "args.autoscaling.look_back_period_s", "Input should be a valid number, unable to parse string as a number"),
    ("policy kwargs from Serve", lambda kw: SLOAutoscalingPolicy(**kw), {"hysteresis": 1.0}, SLOScalingConfigError,
     "hysteresis", "Input should be less than 1, got 1.0"),
    ("app unknown", AppConfig.from_args, {"replicas": 2}, EngineConfigError, "args.replicas", "unknown field (known: "),
    ("app type", AppConfig.from_args, {"protect_metrics": "yes"}, EngineConfigError, "args.protect_metrics",
     "Input should be a valid boolean, got 'yes'"),
    ("app range", AppConfig.from_args, {"replica_cpus": -1}, EngineConfigError, "args.replica_cpus",
     "Input should be greater than or equal to 0, got -1"),
    ("app nested engine", AppConfig.from_args, {"engine": {"max_decoding": 0}}, EngineConfigError,
     "args.engine.max_decoding", "Input should be greater than 0, got 0"),
    ("app nested decode", AppConfig.from_args, {"engine": {"role": "prefill"}, "decode": {"gpus": 1}},
     EngineConfigError, "args.decode.gpus", "unknown field (known: engine, num_replicas, replica_cpus, replica_gpus)"),
    ("app nested slo", AppConfig.from_args, {"slo": _slo(0, "priority", 0.5)}, SLOConfigError,
     "args.slo.classes[0].priority", "Input should be a valid integer, got 0.5"),
]


@pytest.mark.parametrize(("parse", "data", "error", "field", "message"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_a_bad_setting_names_its_field_and_what_was_expected(parse, data, error, field, message):
    with pytest.raises(ValueError) as info:
        parse(data)
    exc = info.value
    assert type(exc) is error
    assert _field(exc) == field
    assert str(exc).startswith(f"{field}: {message}")


def test_the_unknown_field_error_lists_the_known_fields():
    with pytest.raises(EngineConfigError) as info:
        EngineConfig.from_dict({"kv_cache_byte": 1})
    known = str(info.value).split("(known: ", 1)[1].rstrip(")").split(", ")
    assert known == sorted(f.name for f in dataclasses.fields(EngineConfig))


def test_every_bad_field_is_reported_and_the_first_one_is_the_field():
    with pytest.raises(EngineConfigError) as info:
        EngineConfig.from_dict({"block_size": 0, "dtype": "int8"}, prefix="args.engine")
    assert info.value.field == "args.engine.dtype"  # declared first
    assert str(info.value) == ("args.engine.dtype: Input should be 'float32', 'bfloat16' or 'float16', got 'int8'; "
                               "args.engine.block_size: Input should be greater than 0, got 0")


def test_configs_built_in_code_are_checked_the_same_way_naming_the_field():
    with pytest.raises(EngineConfigError) as info:
        EngineConfig(alpha=1.0)
    assert str(info.value) == "alpha: Input should be less than 1, got 1.0"
    with pytest.raises(EngineConfigError) as info:  # replace() builds a new, validated config
        dataclasses.replace(EngineConfig(), max_waiting=0)
    assert info.value.field == "max_waiting"
    with pytest.raises(SLOConfigError) as info:  # a positional argument is named by its field
        SLOClass("web", 0.3, None, True)
    assert info.value.path == "priority"
    with pytest.raises(SLOConfigError) as info:
        SLOPolicy((SLOClass("a", 1.0), SLOClass("a", 2.0)), "a")
    assert str(info.value) == "classes[1].name: duplicate class name 'a'"
    assert EngineConfig(max_queued_work_s=120).max_queued_work_s == 120.0
    assert hash(SLOPolicy.default()) == hash(SLOPolicy.default())  # cached protocol configs hash it


@pytest.mark.parametrize(("entry", "field", "message"), [
    ({"name": "a", "key": "long-enough-1", "burst": 2, "colour": "red"}, "[0].colour", "unknown field (known: "),
    ({"name": "a", "key": "long-enough-1", "rate_limit_rps": "fast"}, "[0].rate_limit_rps",
     "Input should be a valid number, got 'fast'"),
    ({"name": "a", "key": "long-enough-1", "burst": 0.5}, "[0].burst",
     "Input should be greater than or equal to 1, got 0.5"),
    ({"name": "a", "key": "secret7"}, "[0].key", "String should have at least 8 characters"),
    ({"name": "a", "key": 12345678}, "[0].key", "Input should be a valid string"),
    ({"name": "a"}, "[0].key", "give exactly one of key and key_env"),
])
def test_a_bad_api_key_entry_names_the_file_and_field_and_never_shows_a_key(tmp_path, entry, field, message):
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump([entry]))
    with pytest.raises(AccessConfigError) as info:
        AccessPolicy.from_sources(env={}, keys_file=str(keys))
    assert str(info.value).startswith(f"{keys}: {field}: {message}")
    assert str(entry.get("key")) not in str(info.value)
    with pytest.raises(EngineConfigError) as info:  # the app refuses it at start, naming its setting
        AppConfig.from_args({"api_keys_file": str(keys)})
    assert info.value.field == "args.api_keys_file" and f"{field}: {message}" in str(info.value)


def test_ray_config_yaml_is_valid_and_a_bad_value_in_it_is_named_by_its_path(tmp_path):
    config = ROOT / "ray_config.yaml"
    AppConfig.from_args(load_app_args(config))
    data = yaml.safe_load(config.read_text())
    args = data["applications"][0]["args"]
    args["slo"]["classes"][1]["ttft_slo_ms"] = -5
    args["engine"]["late_reject_factor"] = 0.5
    bad = tmp_path / "ray_config.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(EngineConfigError) as info:  # the engine is checked first
        AppConfig.from_args(load_app_args(bad))
    assert str(info.value) == "args.engine.late_reject_factor: Input should be greater than or equal to 1, got 0.5"
    args["engine"]["late_reject_factor"] = 1.5
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(SLOConfigError) as info:
        AppConfig.from_args(load_app_args(bad))
    assert str(info.value) == "args.slo.classes[1].ttft_slo_ms: Input should be greater than 0, got -5"


def test_the_cli_reports_a_bad_engine_setting_by_name_and_exits_2(tmp_path, capsys):
    from cluster.cli import main

    trace = tmp_path / "never-read.jsonl"  # the settings are refused before the trace is read
    assert main(["bench", "serve", "--trace", str(trace), "--engine-set", "max_waiting=0"]) == 2
    err = capsys.readouterr().err
    assert "flowprefill: error: --engine-set.max_waiting: Input should be greater than 0, got 0" in err
