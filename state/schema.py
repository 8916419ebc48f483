"""Redis key schema for FlowPrefill's shared cluster state.

Every key starts with ``fp:{namespace}:`` (namespace = the Serve application name, default
``flowprefill``), so several applications can share one Redis.  Values are JSON with a schema
version ``"v": 1``; readers validate every field and raise :class:`SchemaError` naming the key
and the field (unknown fields are ignored, so newer writers can add fields).

| key (after ``fp:{ns}:``)  | type   | TTL             | written by      | value |
|---------------------------|--------|-----------------|-----------------|-------|
| ``replicas``              | SET    | -               | replica         | ids of registered replicas (1) |
| ``replica:{id}:info``     | STRING | -               | replica         | :class:`ReplicaInfo` JSON |
| ``replica:{id}:state``    | STRING | heartbeat (5 s) | replica         | :class:`ReplicaQueueState` JSON (2) |
| ``replica:{id}:inflight`` | HASH   | 60 s, on add    | router, replica | request id -> predicted seconds (3) |
| ``replica:{id}:prefixes`` | STRING | heartbeat (5 s) | replica         | :class:`PrefixSummary` JSON (6) |
| ``journal``               | HASH   | -               | router, replica | request id -> :class:`JournalEntry` (4) |
| ``journal:replica:{id}``  | SET    | -               | router, replica | request ids on that replica (4) |
| ``profile:{model}:{hw}``  | STRING | -               | replica         | TTFT cost-model JSON (5) |

1. A member whose ``state`` key has expired is not routable (a dead or stalled replica).
2. Rewritten on every scheduler event: the waiting / suspended / running requests in priority
   order with deadline and predicted remaining prefill seconds, the running batch's remaining
   seconds, free KV tokens, engine kind, model, ``updated_at`` and a sequence number.
3. Work dispatched by routers but not yet reported in the replica's ``state``.  A router adds a
   field and reads the new total atomically (Lua) and resets the TTL; the replica deletes the
   fields of the requests its published state reports (same transaction as the state write).
4. Everything needed to run the request again (prompt ids or text, sampling params, SLO class,
   deadline, replica id, status, attempts), so requests on a replica that dies are re-dispatched
   or answered with an error, never silently lost.  Removed when the request completes.
5. A cost profile as a JSON object (the replica's ``CostModel.to_dict()``, validated by the reader that
   builds the model from it; this package only checks it is an object); ``{model}`` may contain ``/`` or ``:``.
6. What the replica's prefix cache holds, for prefix-aware placement: the routing names (8 hex
   characters each, every ``block_tokens`` tokens of a cached chain) of at most
   :data:`MAX_PREFIX_NAMES` cached blocks, held ones first, then most recently used; written only
   when its ``version`` (also in the state, ``prefix_version``) changed, so routers re-read it then.
   At most ``9 * MAX_PREFIX_NAMES`` bytes of names (about 4.6 KiB).

Times (``deadline``, ``arrival``, ``updated_at``) are Unix seconds (``time.time()``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from state.fields import FieldReader

SCHEMA_VERSION = 1
DEFAULT_NAMESPACE = "flowprefill"
MAX_PREFIX_NAMES = 512
_HEX8 = frozenset("0123456789abcdef")
REQUEST_STATUSES = ("waiting", "suspended", "running")
#: What a replica does: both phases, prompts only (handing KV over), or decoding handed-over requests only.
REPLICA_ROLES = ("colocated", "prefill", "decode")
JOURNAL_STATUSES = ("accepted", "running", "finished", "failed")


class SchemaError(ValueError):
    """Invalid data under a Redis key: names the key and (when known) the field."""

    def __init__(self, key: str, field_name: str | None, message: str) -> None:
        where = f" field {field_name!r}:" if field_name else ""
        super().__init__(f"invalid data under Redis key {key!r}:{where} {message}")
        self.key = key
        self.field = field_name


def _check_part(kind: str, value: str, *, allow_colon: bool = False) -> str:
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise ValueError(f"{kind} must be a non-empty string without whitespace, got {value!r}")
    if not allow_colon and ":" in value:
        raise ValueError(f"{kind} must not contain ':', got {value!r}")
    return value


@dataclass(frozen=True)
class Keys:
    """Builds the key names of one namespace (see the module docstring for the table)."""

    namespace: str = DEFAULT_NAMESPACE

    def __post_init__(self) -> None:
        _check_part("namespace", self.namespace)

    @property
    def prefix(self) -> str:
        """``fp:{namespace}:``."""
        return f"fp:{self.namespace}:"

    def replicas(self) -> str:
        """SET of registered replica ids."""
        return self.prefix + "replicas"

    def replica_info(self, replica_id: str) -> str:
        """STRING: :class:`ReplicaInfo` JSON."""
        return f"{self.prefix}replica:{_check_part('replica id', replica_id)}:info"

    def replica_state(self, replica_id: str) -> str:
        """STRING with TTL: :class:`ReplicaQueueState` JSON."""
        return f"{self.prefix}replica:{_check_part('replica id', replica_id)}:state"

    def replica_prefixes(self, replica_id: str) -> str:
        """STRING with TTL: :class:`PrefixSummary` JSON."""
        return f"{self.prefix}replica:{_check_part('replica id', replica_id)}:prefixes"

    def replica_inflight(self, replica_id: str) -> str:
        """HASH request id -> predicted seconds dispatched but not yet reported."""
        return f"{self.prefix}replica:{_check_part('replica id', replica_id)}:inflight"

    def journal(self) -> str:
        """HASH request id -> :class:`JournalEntry` JSON."""
        return self.prefix + "journal"

    def journal_replica(self, replica_id: str) -> str:
        """SET of request ids journalled on one replica."""
        return f"{self.prefix}journal:replica:{_check_part('replica id', replica_id)}"

    def profile(self, model: str, hardware: str) -> str:
        """STRING: cost-model JSON (model names may contain ':' or '/')."""
        model = _check_part("model", model, allow_colon=True)
        return f"{self.prefix}profile:{model}:{_check_part('hardware', hardware, allow_colon=True)}"


def _reader(data: object, key: str, path: str = "") -> FieldReader:
    """A :class:`~state.fields.FieldReader` whose errors are :class:`SchemaError` naming ``key``."""
    return FieldReader(data, lambda field_name, message: SchemaError(key, field_name, message), path)


def _load(raw: str | bytes, key: str) -> FieldReader:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SchemaError(key, None, f"not valid JSON ({exc})") from exc
    reader = _reader(data, key)
    version = reader.data.get("v")
    if version != SCHEMA_VERSION:
        raise SchemaError(key, "v", f"unsupported schema version {version!r} (expected {SCHEMA_VERSION})")
    return reader


def _dump(obj: Any) -> str:
    return json.dumps({"v": SCHEMA_VERSION, **asdict(obj)}, separators=(",", ":"), allow_nan=False)


@dataclass(frozen=True)
class ReplicaInfo:
    """Static facts about a replica, written once when it registers."""

    replica_id: str
    model: str
    engine_kind: str
    policy: str = ""
    hardware: str = ""
    registered_at: float = 0.0

    def to_json(self) -> str:
        """Serialize (with the schema version)."""
        return _dump(self)

    @classmethod
    def from_json(cls, raw: str | bytes, key: str = "<replica info>") -> ReplicaInfo:
        """Parse and validate; errors name ``key`` and the field."""
        r = _load(raw, key)
        return cls(
            replica_id=r.text("replica_id"),
            model=r.text("model"),
            engine_kind=r.text("engine_kind"),
            policy=r.text("policy", ""),
            hardware=r.text("hardware", ""),
            registered_at=r.number("registered_at", 0.0),
        )


@dataclass(frozen=True)
class QueuedRequest:
    """One request in a replica's queue state (``status``: waiting, suspended or running)."""

    request_id: str
    status: str
    deadline: float
    predicted_remaining_s: float
    prompt_tokens: int = 0

    def __post_init__(self) -> None:
        if self.status not in REQUEST_STATUSES:
            raise ValueError(f"status must be one of {REQUEST_STATUSES}, got {self.status!r}")


@dataclass(frozen=True)
class ReplicaQueueState:
    """A replica's scheduler snapshot, published on every event (requests in priority order)."""

    replica_id: str
    engine_kind: str
    model: str
    updated_at: float
    seq: int
    requests: tuple[QueuedRequest, ...] = ()
    running_remaining_s: float = 0.0
    kv_free_tokens: int = 0
    preemptions: int = 0  # running total since the replica started
    cost_scale: float = 1.0  # measured prefill time over the profile's prediction (calibration)
    prefix_version: int = 0  # the version of the replica's PrefixSummary (0: none published)
    prefix_hit_tokens: int = 0  # running totals of the prefix cache: prompt tokens found cached ...
    prefix_queried_tokens: int = 0  # ... of the prompt tokens looked up
    prefix_evictions: int = 0  # ... and cached blocks evicted for other content
    role: str = "colocated"  # REPLICA_ROLES: a decode replica is placed by the fields below
    decoding: int = 0  # sequences in the decode batch now
    kv_total_tokens: int = 0  # the KV pool's size (kv_free_tokens of it are free or evictable)
    max_decoding: int = 0  # sequences one decode step takes at most (0: unknown)
    decode_step_interval_s: float = 0.0  # smoothed seconds between decode steps of a busy batch (0: unknown)
    tpot_s: float = 0.0  # the decoding streams' time per output token now (0: none decoding)
    tpot_target_s: float = 0.0  # the tightest TPOT SLO among them (0: none decoding)

    def __post_init__(self) -> None:
        if self.role not in REPLICA_ROLES:
            raise SchemaError("<replica state>", "role",
                              f"must be one of {', '.join(REPLICA_ROLES)}, got {self.role!r}")

    @property
    def request_ids(self) -> tuple[str, ...]:
        """Ids of every request the replica reports (used to clear in-flight entries)."""
        return tuple(q.request_id for q in self.requests)

    @property
    def pending_work_s(self) -> float:
        """Sum of the predicted remaining prefill seconds of all reported requests."""
        return sum(q.predicted_remaining_s for q in self.requests)

    def to_json(self) -> str:
        """Serialize (with the schema version)."""
        return _dump(self)

    @classmethod
    def from_json(cls, raw: str | bytes, key: str = "<replica state>") -> ReplicaQueueState:
        """Parse and validate; errors name ``key`` and the field (e.g. ``requests[2].deadline``)."""
        r = _load(raw, key)
        requests = []
        for i, item in enumerate(r.array("requests", [])):
            q = r.item("requests", i, item)
            requests.append(
                QueuedRequest(
                    request_id=q.text("request_id"),
                    status=q.text("status", choices=REQUEST_STATUSES),
                    deadline=q.number("deadline"),
                    predicted_remaining_s=q.number("predicted_remaining_s", minimum=0.0),
                    prompt_tokens=q.integer("prompt_tokens", 0, minimum=0),
                )
            )
        return cls(
            replica_id=r.text("replica_id"),
            engine_kind=r.text("engine_kind"),
            model=r.text("model"),
            updated_at=r.number("updated_at"),
            seq=r.integer("seq", minimum=0),
            requests=tuple(requests),
            running_remaining_s=r.number("running_remaining_s", 0.0, minimum=0.0),
            kv_free_tokens=r.integer("kv_free_tokens", 0, minimum=0),
            preemptions=r.integer("preemptions", 0, minimum=0),
            cost_scale=r.number("cost_scale", 1.0, minimum=0.0),
            prefix_version=r.integer("prefix_version", 0, minimum=0),
            prefix_hit_tokens=r.integer("prefix_hit_tokens", 0, minimum=0),
            prefix_queried_tokens=r.integer("prefix_queried_tokens", 0, minimum=0),
            prefix_evictions=r.integer("prefix_evictions", 0, minimum=0),
            role=r.text("role", "colocated", choices=REPLICA_ROLES),
            decoding=r.integer("decoding", 0, minimum=0),
            kv_total_tokens=r.integer("kv_total_tokens", 0, minimum=0),
            max_decoding=r.integer("max_decoding", 0, minimum=0),
            decode_step_interval_s=r.number("decode_step_interval_s", 0.0, minimum=0.0),
            tpot_s=r.number("tpot_s", 0.0, minimum=0.0),
            tpot_target_s=r.number("tpot_target_s", 0.0, minimum=0.0),
        )


@dataclass(frozen=True)
class PrefixSummary:
    """A bounded summary of one replica's prefix cache (see note 6 of the module docstring).

    ``names``: routing names (8 hex characters: the first 4 bytes of a block name,
    ``replicas.prefix_hash``) of cached chains every ``block_tokens`` tokens; ``salt`` names the
    model and dtype the names were computed for; ``version`` grows whenever the cache changed.
    """

    version: int
    block_tokens: int
    salt: str
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(self.names[:MAX_PREFIX_NAMES]))

    def to_json(self) -> str:
        """Serialize (with the schema version)."""
        return _dump(self)

    @classmethod
    def from_json(cls, raw: str | bytes, key: str = "<prefix summary>") -> PrefixSummary:
        """Parse and validate; errors name ``key`` and the field."""
        r = _load(raw, key)
        names = r.array("names", [])
        if len(names) > MAX_PREFIX_NAMES or not all(isinstance(n, str) and len(n) == 8 and set(n) <= _HEX8
                                                    for n in names):
            raise r.fail("names", f"expected at most {MAX_PREFIX_NAMES} strings of 8 lowercase hex digits")
        return cls(version=r.integer("version", minimum=0), block_tokens=r.integer("block_tokens", minimum=1),
                   salt=r.text("salt"), names=tuple(names))


@dataclass(frozen=True)
class JournalEntry:
    """An accepted request, kept until it finishes so a dead replica's work can be re-dispatched.

    Exactly what is needed to run it again: ``prompt_token_ids`` or ``prompt`` (text), ``params``
    (sampling parameters as JSON), the SLO class and absolute deadline.
    """

    request_id: str
    replica_id: str
    slo_class: str
    deadline: float
    arrival: float
    params: Mapping[str, Any] = field(default_factory=dict)
    prompt_token_ids: tuple[int, ...] | None = None
    prompt: str | None = None
    status: str = "accepted"
    attempts: int = 1
    updated_at: float = 0.0

    def __post_init__(self) -> None:
        if self.status not in JOURNAL_STATUSES:
            raise ValueError(f"status must be one of {JOURNAL_STATUSES}, got {self.status!r}")
        if self.prompt_token_ids is None and self.prompt is None:
            raise ValueError("a journal entry needs prompt_token_ids or prompt")
        object.__setattr__(self, "params", dict(self.params))  # JSON-ready, detached from the caller
        if self.prompt_token_ids is not None:
            object.__setattr__(self, "prompt_token_ids", tuple(self.prompt_token_ids))

    def to_json(self) -> str:
        """Serialize (with the schema version)."""
        return _dump(self)

    @classmethod
    def from_json(cls, raw: str | bytes, key: str = "<journal entry>") -> JournalEntry:
        """Parse and validate; errors name ``key`` and the field."""
        r = _load(raw, key)
        ids = r.array("prompt_token_ids", None)
        if ids is not None and not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
            raise r.fail("prompt_token_ids", "expected a list of non-negative integers")
        prompt = r.text("prompt", None)
        if ids is None and prompt is None:
            raise r.fail("prompt_token_ids", "missing (and no 'prompt' either)")
        return cls(
            request_id=r.text("request_id"),
            replica_id=r.text("replica_id"),
            slo_class=r.text("slo_class"),
            deadline=r.number("deadline"),
            arrival=r.number("arrival"),
            params=r.obj("params", {}),
            prompt_token_ids=None if ids is None else tuple(ids),
            prompt=prompt,
            status=r.text("status", choices=JOURNAL_STATUSES),
            attempts=r.integer("attempts", 1, minimum=1),
            updated_at=r.number("updated_at", 0.0),
        )
