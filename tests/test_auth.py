"""API keys (router.auth): authentication, per-key SLO classes, rate limits, key-file errors."""

from __future__ import annotations

import pytest

from router.api_errors import APIError
from router.auth import AccessConfigError, AccessPolicy


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _policy(tmp_path, text: str, env: dict | None = None, suffix: str = ".yaml") -> AccessPolicy:
    path = tmp_path / f"keys{suffix}"
    path.write_text(text)
    return AccessPolicy.from_sources(env=env or {}, keys_file=str(path))


def test_off_without_keys_and_every_request_passes():
    policy = AccessPolicy.from_sources(env={})
    assert not policy.enabled and policy.authenticate(None) is None
    policy.authorize(None, "anything")


def test_bearer_keys_from_env_and_file(tmp_path):
    policy = _policy(tmp_path, "- {name: web, key: web-key-123, allowed_classes: [interactive]}\n",
                     env={"FLOWPREFILL_API_KEYS": "env-key-aaa, env-key-bbb"})
    assert [k.name for k in policy.keys] == ["FLOWPREFILL_API_KEYS[0]", "FLOWPREFILL_API_KEYS[1]", "web"]
    assert policy.authenticate("Bearer env-key-bbb").name == "FLOWPREFILL_API_KEYS[1]"
    assert policy.authenticate("bearer web-key-123").name == "web"
    for bad, message in [(None, "missing API key"), ("Basic d2ViOmtleQ==", "missing API key"),
                         ("Bearer web-key-12", "invalid API key"), ("Bearer ", "missing API key")]:
        with pytest.raises(APIError) as err:
            policy.authenticate(bad)
        assert err.value.status == 401 and message in err.value.message and err.value.param == "authorization"
        assert "web-key-123" not in err.value.message  # the secret never appears in an error


def test_classes_per_key_are_enforced(tmp_path):
    policy = _policy(tmp_path, "- {name: batch-only, key: batch-key-1, allowed_classes: [batch]}\n")
    key = policy.authenticate("Bearer batch-key-1")
    policy.authorize(key, "batch")
    with pytest.raises(APIError) as err:
        policy.authorize(key, "interactive")
    assert err.value.status == 403 and err.value.param == "x-slo-class" and "batch-only" in err.value.message


def test_rate_limit_is_a_token_bucket_with_retry_after(tmp_path):
    policy = _policy(tmp_path, "- {name: slow, key: slow-key-1, rate_limit_rps: 2, burst: 3}\n")
    clock = policy.clock = Clock()
    key = policy.authenticate("Bearer slow-key-1")
    for _ in range(3):  # the burst
        policy.authorize(key, "standard")
    with pytest.raises(APIError) as err:
        policy.authorize(key, "standard")
    assert err.value.status == 429 and err.value.headers == {"Retry-After": "1"}
    clock.now = 0.5  # one token refilled at 2 per second
    policy.authorize(key, "standard")
    with pytest.raises(APIError):
        policy.authorize(key, "standard")


def test_key_from_another_env_var(tmp_path):
    policy = _policy(tmp_path, '[{"name": "ci", "key_env": "CI_KEY"}]', env={"CI_KEY": "from-the-env-1"},
                     suffix=".json")
    assert policy.authenticate("Bearer from-the-env-1").name == "ci"


@pytest.mark.parametrize(
    ("text", "suffix", "expected"),
    [
        ("- {name: a, key: short}\n", ".yaml", "[0].key: String should have at least 8 characters"),
        ("- {name: a, key: long-enough-1, rate_limit_rps: -1}\n", ".yaml", "[0].rate_limit_rps"),
        ("- {name: a, key: long-enough-1, colour: red}\n", ".yaml", "[0].colour: unknown field"),
        ("- {name: a, key: long-enough-1}\n- {name: a, key: long-enough-2}\n", ".yaml", "'a' is used twice"),
        ("- {name: a, key_env: MISSING}\n", ".yaml", "[0].key_env: environment variable 'MISSING'"),
        ("- {name: a, key: long-enough-1, allowed_classes: batch}\n", ".yaml", "[0].allowed_classes"),
        ("- {name: a\n  key: [\n", ".yaml", "not valid YAML at line"),
        ('[{"name": "a",}]', ".json", "not valid JSON at line 1, column"),
        ("name: a\n", ".yaml", "Input should be a list, got dict"),
    ],
)
def test_bad_key_files_name_the_file_and_field(tmp_path, text, suffix, expected):
    with pytest.raises(AccessConfigError) as err:
        _policy(tmp_path, text, suffix=suffix)
    assert expected in str(err.value) and "keys" in str(err.value)
