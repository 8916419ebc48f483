"""Tokenizer and chat template of an HF checkpoint, without importing transformers.

Reads ``tokenizer.json`` with the ``tokenizers`` library and renders the checkpoint's Jinja chat
template the way transformers does (sandboxed, ``trim_blocks``/``lstrip_blocks``, ``raise_exception``,
``bos_token``/``eos_token`` in scope), so ``encode_chat`` gives the same ids as
``AutoTokenizer.apply_chat_template(..., tokenize=True)``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, NoReturn

import jinja2
import jinja2.ext
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from replicas.model.errors import CheckpointError

CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})


def validate_messages(messages: object) -> list[dict[str, Any]]:
    """Check chat messages (``role``, string ``content``; other keys, such as an assistant's
    ``tool_calls``, pass to the template as they are); raise ``ValueError`` naming the bad field
    (e.g. ``messages[1].role``)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: expected a non-empty list of {'role', 'content'} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}]: expected an object, got {type(message).__name__}")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise ValueError(f"messages[{i}].role: expected one of {sorted(CHAT_ROLES)}, got {role!r}")
        if not isinstance(message.get("content"), str):
            got = type(message.get("content")).__name__
            raise ValueError(f"messages[{i}].content: expected a string, got {got}")
    return messages


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _token_content(value: object) -> str | None:
    """A special token as saved by transformers: a string or an ``AddedToken`` dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path, required: bool = False) -> dict[str, Any] | None:
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path}: missing")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _eos_ids(data: dict[str, Any] | None, path: Path, vocab_size: int) -> list[int]:
    if data is None or data.get("eos_token_id") is None:
        return []
    value = data["eos_token_id"]
    ids = value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in ids):
        raise CheckpointError(
            f"{path}: field 'eos_token_id' must be an id or a list of ids below the vocabulary size "
            f"{vocab_size}, got {value!r}"
        )
    return list(ids)


def _pick_template(value: object, path: Path) -> str | None:
    """``chat_template`` is a string, or a list of ``{"name", "template"}`` (use ``default``)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        template = named.get("default")
        if isinstance(template, str):
            return template
    raise CheckpointError(f"{path}: field 'chat_template' must be a string or a list with a 'default' entry")


class Tokenizer:
    """Text <-> token ids and chat-template rendering for one checkpoint directory."""

    def __init__(
        self,
        tokenizer: _HFTokenizer,
        *,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        eos_token_ids: Sequence[int] = (),
        add_bos_token: bool = False,
        source: str = "<memory>",
    ) -> None:
        self._tok = tokenizer
        self._chat_template = chat_template
        self._bos_token = bos_token
        self._eos_token = eos_token
        self._add_bos = add_bos_token
        self._source = source
        ids: list[int] = list(eos_token_ids)
        if eos_token is not None and (eos_id := tokenizer.token_to_id(eos_token)) is not None:
            ids.append(eos_id)
        self._eos_ids = tuple(dict.fromkeys(ids))
        if self._eos_token is None and self._eos_ids:
            self._eos_token = tokenizer.id_to_token(self._eos_ids[0])

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load ``tokenizer.json`` (required) plus template and special tokens from an HF directory."""
        root = Path(path)
        tok_path = root / "tokenizer.json"
        if not tok_path.is_file():
            raise CheckpointError(f"{tok_path}: missing (an HF model directory needs tokenizer.json)")
        try:
            tokenizer = _HFTokenizer.from_file(str(tok_path))
        except Exception as exc:  # the Rust side raises a bare Exception on malformed files
            raise CheckpointError(f"{tok_path}: cannot be loaded by the tokenizers library ({exc})") from exc

        cfg_path = root / "tokenizer_config.json"
        cfg = _read_json(cfg_path) or {}
        template = _pick_template(cfg.get("chat_template"), cfg_path)
        jinja_path = root / "chat_template.jinja"
        if jinja_path.is_file():
            template = jinja_path.read_text(encoding="utf-8")

        special = _read_json(root / "special_tokens_map.json") or {}
        bos = _token_content(cfg.get("bos_token")) or _token_content(special.get("bos_token"))
        eos = _token_content(cfg.get("eos_token")) or _token_content(special.get("eos_token"))
        add_bos = cfg.get("add_bos_token", False)
        if not isinstance(add_bos, bool):
            raise CheckpointError(f"{cfg_path}: field 'add_bos_token' must be a boolean, got {add_bos!r}")

        vocab = tokenizer.get_vocab_size(with_added_tokens=True)
        gen_path, model_path = root / "generation_config.json", root / "config.json"
        model_cfg = _read_json(model_path)
        eos_ids = _eos_ids(_read_json(gen_path), gen_path, vocab) + _eos_ids(model_cfg, model_path, vocab)
        if bos is None and model_cfg is not None and isinstance(model_cfg.get("bos_token_id"), int):
            bos = tokenizer.id_to_token(model_cfg["bos_token_id"])
        for name, token in (("bos_token", bos), ("eos_token", eos)):
            if token is not None and tokenizer.token_to_id(token) is None:
                raise CheckpointError(f"{cfg_path}: field {name!r} = {token!r} is not in the vocabulary")
        return cls(
            tokenizer,
            chat_template=template,
            bos_token=bos,
            eos_token=eos,
            eos_token_ids=eos_ids,
            add_bos_token=add_bos,
            source=str(root),
        )

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added special tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def to_json(self) -> str:
        """The ``tokenizer.json`` text (what a grammar library builds its token trie from)."""
        return self._tok.to_str()

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Ids that end generation (generation_config, config and tokenizer_config merged, deduplicated)."""
        return self._eos_ids

    @property
    def bos_token_id(self) -> int | None:
        """Id of the beginning-of-sequence token, if the checkpoint defines one."""
        return None if self._bos_token is None else self._tok.token_to_id(self._bos_token)

    @property
    def chat_template(self) -> str | None:
        """The raw Jinja chat template, or ``None`` when the checkpoint has none."""
        return self._chat_template

    def token_to_id(self, token: str) -> int | None:
        """Id of ``token`` (e.g. ``"<|im_end|>"``), or ``None`` if it is not in the vocabulary."""
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary's piece for ``token_id`` (e.g. ``"Ġthe"``), or ``None`` outside it."""
        return self._tok.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` the post-processor (and BOS) apply."""
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        bos = self.bos_token_id
        if add_special_tokens and self._add_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @cached_property
    def _compiled_template(self) -> jinja2.Template:
        if self._chat_template is None:
            raise CheckpointError(
                f"{self._source}/tokenizer_config.json: field 'chat_template' is missing "
                "(and there is no chat_template.jinja), so chat messages cannot be formatted"
            )
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            return env.from_string(self._chat_template)
        except jinja2.TemplateSyntaxError as exc:
            raise CheckpointError(f"{self._source}: field 'chat_template' is not valid Jinja ({exc})") from exc

    @cached_property
    def template_uses_tools(self) -> bool:
        """Whether the chat template reads the ``tools`` variable (HF's ``apply_chat_template(tools=...)``);
        False without a template."""
        if self._chat_template is None:
            return False
        env = self._compiled_template.environment
        return "tools" in jinja2.meta.find_undeclared_variables(env.parse(self._chat_template))

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None) -> str:
        """Render ``messages`` with the checkpoint's chat template; ``tools`` (OpenAI tool definitions)
        are passed to it as transformers does (a template that ignores them renders without them)."""
        validate_messages(messages)
        return self._compiled_template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self._bos_token or "",
            eos_token=self._eos_token or "",
            tools=tools or None,
            documents=None,
        )

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of the rendered chat; the template already holds any special tokens."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, tools), add_special_tokens=False)
