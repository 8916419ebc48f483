"""Offline checks for deploy/: Kubernetes CRD schemas as JSON Schema, and a small Dockerfile linter.

**CRD schemas.** A CRD's ``openAPIV3Schema`` is close to JSON Schema (draft 4/7) plus Kubernetes
extensions that a validator must honour. :func:`k8s_to_jsonschema` converts one:

* ``nullable: true`` adds ``null`` to the type; ``format: int32/int64`` becomes a numeric range;
* ``x-kubernetes-int-or-string`` drops ``type`` and accepts an integer or a string (a float such
  as ``cpu: 0.5`` is refused, as the API server refuses it);
* ``x-kubernetes-preserve-unknown-fields`` keeps an object open; every other object with
  ``properties`` is closed (``additionalProperties: false``), like kubectl's strict field
  validation, so a misspelt or misplaced field fails instead of being pruned silently;
* ``x-kubernetes-embedded-resource`` requires ``apiVersion`` and ``kind`` (with ``metadata``);
* ``x-kubernetes-validations``: CEL cannot be evaluated here; the ``self in [...]`` form becomes an
  ``enum`` and transition rules (``oldSelf``) are skipped, since they only apply to updates; any
  other rule is reported by :func:`unsupported_rules` so a test can notice new ones;
* ``x-kubernetes-list-type`` (``set``: unique items; ``map``: unique ``x-kubernetes-list-map-keys``)
  is checked by extra keywords of the validator (:data:`K8sValidator`).

The top-level ``metadata`` (``type: object`` in a CRD) gets :data:`OBJECT_META`.

**Dockerfiles.** ``hadolint`` is not packaged for this machine's Debian, so :func:`lint_dockerfile`
checks the rules that matter for these images (hadolint codes in brackets where one exists):
every ``FROM`` pinned to a tag or digest that is not ``latest`` [DL3006, DL3007]; the final
``USER`` is not root [DL3002]; no ``ADD`` (no remote URLs, no implicit extraction) [DL3020];
``apt-get install`` with ``-y --no-install-recommends`` and the lists removed in the same ``RUN``
[DL3014, DL3015, DL3009]; pip without a cache [DL3042]; ``SHELL`` with ``pipefail`` before a
``RUN`` with a pipe [DL4006]; no ``sudo`` [DL3004]; absolute ``WORKDIR`` [DL3000]; JSON-form
``CMD``/``ENTRYPOINT`` [DL3025]; ``EXPOSE`` of the Serve HTTP and gRPC ports.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from jsonschema import Draft7Validator, validators
from jsonschema.exceptions import ValidationError

_INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}
_CEL_IN = re.compile(r"^\s*self\s+in\s+\[(.*)\]\s*$")
_DNS_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}

OBJECT_META: dict[str, Any] = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "maxLength": 253, "pattern": _DNS_NAME},
        "namespace": {"type": "string", "pattern": _DNS_NAME},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
    },
}


def _cel_enum(rule: str) -> list[Any] | None:
    match = _CEL_IN.match(rule)
    if not match:
        return None
    return [item.strip().strip("'\"") for item in match.group(1).split(",")]


def k8s_to_jsonschema(node: Any, *, strict: bool = True) -> Any:  # noqa: ANN401
    """A JSON Schema (draft 7) equivalent of one CRD ``openAPIV3Schema`` node (see the module docstring)."""
    if isinstance(node, list):
        return [k8s_to_jsonschema(x, strict=strict) for x in node]
    if not isinstance(node, Mapping):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties"):
            out[key] = {name: k8s_to_jsonschema(sub, strict=strict) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, Mapping):
            out[key] = k8s_to_jsonschema(value, strict=strict)
        elif key in ("anyOf", "oneOf", "allOf"):
            out[key] = [k8s_to_jsonschema(sub, strict=strict) for sub in value]
        elif key == "x-kubernetes-validations":
            enums = [e for e in (_cel_enum(r["rule"]) for r in value) if e is not None]
            if enums:
                out["enum"] = enums[0]
        elif key not in ("nullable", "format"):
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("format") in _INT_RANGES and node.get("type") == "integer":
        low, high = _INT_RANGES[node["format"]]
        out["minimum"], out["maximum"] = max(out.get("minimum", low), low), min(out.get("maximum", high), high)
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-embedded-resource"):
        props = out.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
        out["required"] = sorted({*out.get("required", ()), "apiVersion", "kind"})
    open_object = node.get("x-kubernetes-preserve-unknown-fields")
    if strict and out.get("type") == "object" and "properties" in out and "additionalProperties" not in out:
        if not open_object:
            out["additionalProperties"] = False
    return out


def unsupported_rules(node: Any, path: str = "") -> Iterator[str]:  # noqa: ANN401
    """CEL rules :func:`k8s_to_jsonschema` neither converts nor may skip (path: rule)."""
    if isinstance(node, list):
        for i, x in enumerate(node):
            yield from unsupported_rules(x, f"{path}[{i}]")
    elif isinstance(node, Mapping):
        for rule in node.get("x-kubernetes-validations", ()):
            if "oldSelf" not in rule["rule"] and _cel_enum(rule["rule"]) is None:
                yield f"{path}: {rule['rule']}"
        for key, value in node.items():
            if key != "x-kubernetes-validations":
                yield from unsupported_rules(value, f"{path}/{key}")


def _list_type(validator: Any, list_type: str, instance: Any, schema: Mapping[str, Any]) -> Iterator[ValidationError]:  # noqa: ANN401
    if not isinstance(instance, list):
        return
    if list_type == "set" and len({repr(x) for x in instance}) != len(instance):
        yield ValidationError(f"x-kubernetes-list-type set: duplicate items in {instance!r}")
    if list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", ())
        seen = [tuple(item.get(k) for k in keys) for item in instance if isinstance(item, Mapping)]
        dupes = {k for k in seen if seen.count(k) > 1}
        if dupes:
            yield ValidationError(f"x-kubernetes-list-type map: duplicate {list(keys)} {sorted(dupes, key=repr)}")


K8sValidator = validators.extend(Draft7Validator, {"x-kubernetes-list-type": _list_type})


def crd_validator(openapi_schema: Mapping[str, Any]) -> Any:  # noqa: ANN401
    """A validator for objects of the CRD whose ``openAPIV3Schema`` is given (``status`` is not authored)."""
    schema = k8s_to_jsonschema(openapi_schema)
    schema["properties"]["metadata"] = OBJECT_META
    schema["properties"].pop("status", None)
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return K8sValidator(schema)


def errors(validator: Any, document: Any) -> list[str]:  # noqa: ANN401
    """Every validation error as ``path: message`` (empty when the document is valid)."""
    found = sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in found]


# ---------------------------------------------------------------------------------- Dockerfiles
@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction (continuation lines joined), with its first line number."""

    line: int
    keyword: str
    args: str


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions of a Dockerfile; comments and blank lines dropped, ``\\`` continuations joined."""
    out: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if not pending:
            start = number
        pending.append(line.removesuffix("\\").strip())
        if not line.endswith("\\"):
            keyword, _, args = " ".join(pending).partition(" ")
            out.append(Instruction(start, keyword.upper(), args.strip()))
            pending = []
    return out


def lint_dockerfile(text: str, expose: tuple[int, ...] = (8000, 9000)) -> list[str]:
    """Rule violations (``line N: [code] message``); see the module docstring for the rules."""
    instructions = parse_dockerfile(text)
    problems: list[str] = []
    build_args = {}
    for ins in instructions:
        if ins.keyword == "FROM":
            break
        if ins.keyword == "ARG" and "=" in ins.args:
            name, _, default = ins.args.partition("=")
            build_args[name.strip()] = default.strip()
    pipefail = False
    stage_users: list[str] = []
    exposed: set[int] = set()

    def bad(ins: Instruction, code: str, message: str) -> None:
        problems.append(f"line {ins.line}: [{code}] {message}")

    for ins in instructions:
        args = ins.args
        if ins.keyword == "FROM":
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: build_args.get(m.group(1), m.group(0)), args.split()[0])
            tag = image.rsplit("/", 1)[-1]
            if "@sha256:" not in image and (":" not in tag or tag.endswith(":latest") or "$" in image):
                bad(ins, "DL3006/DL3007", f"base image {image!r} is not pinned to a tag or digest other than latest")
            stage_users.append("root")
        elif ins.keyword == "USER":
            stage_users[-1] = args.split(":")[0]
        elif ins.keyword == "ADD":
            bad(ins, "DL3020", "use COPY (ADD fetches URLs and unpacks archives implicitly)")
        elif ins.keyword == "SHELL":
            pipefail = "pipefail" in args
        elif ins.keyword == "WORKDIR" and not args.startswith(("/", "$")):
            bad(ins, "DL3000", f"WORKDIR {args!r} is not absolute")
        elif ins.keyword in ("CMD", "ENTRYPOINT") and not args.startswith("["):
            bad(ins, "DL3025", f"{ins.keyword} should use the JSON (exec) form")
        elif ins.keyword == "EXPOSE":
            exposed |= {int(p.split("/")[0]) for p in args.split()}
        elif ins.keyword == "RUN":
            if re.search(r"(^|[;&|]\s*)sudo\b", args):
                bad(ins, "DL3004", "do not use sudo")
            if re.search(r"[^|]\|[^|]", args) and not pipefail:
                bad(ins, "DL4006", "a RUN with a pipe needs SHELL [..., \"-o\", \"pipefail\", ...] first")
            if "apt-get install" in args:
                for flag, code in (("-y", "DL3014"), ("--no-install-recommends", "DL3015")):
                    if flag not in args.split():
                        bad(ins, code, f"apt-get install without {flag}")
                if "rm -rf /var/lib/apt/lists" not in args:
                    bad(ins, "DL3009", "remove /var/lib/apt/lists in the RUN that installs packages")
            no_cache = "--no-cache-dir" in args or "PIP_NO_CACHE_DIR=1" in text
            if re.search(r"\bpip3? install\b", args) and not no_cache:
                bad(ins, "DL3042", "pip install without --no-cache-dir (or ENV PIP_NO_CACHE_DIR=1)")
    if not stage_users:
        problems.append("line 1: [DL3061] no FROM")
    elif stage_users[-1] in ("root", "0"):
        problems.append(f"line {instructions[-1].line}: [DL3002] the final stage runs as root (add a USER)")
    missing = sorted(set(expose) - exposed)
    if missing:
        problems.append(f"line {instructions[-1].line}: [EXPOSE] missing ports {missing}")
    return problems
