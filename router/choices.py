"""A non-streaming request's replica outputs gathered per choice (``n`` > 1, ``echo``) into its body.

The replica sends each choice's outputs tagged with the choice's ``index``
(:class:`replicas.engine_types.RequestOutput`); every choice ends with its own ``finish_reason``.
Usage counts the prompt once and the completion tokens of all choices, as vLLM's server does. With
completions' ``echo`` each choice's text starts with the prompt and, with ``logprobs``, its log
probabilities start with the prompt tokens' (sent once, on the first output). A chat request with
tools has each choice parsed for tool calls (:func:`router.responses.chat_choice`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from router.logprobs_format import LogprobEntry, LogprobsFormatter, TokenText, vllm_prompt_logprobs
from router.protocol import GenerateRequest
from router.responses import chat_choice, choices_body


class PromptDecoder(Protocol):
    """What :func:`echo_text` needs of :class:`replicas.model.tokenizer.Tokenizer`."""

    def decode(self, ids: Sequence[int]) -> str: ...


def echo_text(req: GenerateRequest, tokenizer: PromptDecoder) -> str | None:
    """The text ``echo`` puts before each choice's (None without ``echo``): the prompt as given, or
    its token ids decoded."""
    if not req.echo:
        return None
    return req.prompt if req.prompt is not None else tokenizer.decode(req.prompt_token_ids or ())


@dataclass
class _Gathered:
    text: list[str] = field(default_factory=list)
    logprobs: list[LogprobEntry] = field(default_factory=list)
    completion_tokens: int = 0
    finish_reason: str = "length"


class ChoiceCollector:
    """Collects one request's outputs (:meth:`add`) and builds its body (:meth:`body`)."""

    def __init__(self, req: GenerateRequest, token_text: TokenText, prompt_text: str | None = None) -> None:
        self.req = req
        self.token_text = token_text
        self.prompt_text = prompt_text
        self.prompt_logprobs: list[LogprobEntry] = []
        self._choices = [_Gathered() for _ in range(req.sampling.n)]

    def add(self, out: Mapping[str, Any]) -> None:
        """One replica output (a dict of :class:`~replicas.engine_types.RequestOutput`)."""
        index = int(out.get("index") or 0)
        if not 0 <= index < len(self._choices):
            raise ValueError(f"output for choice {index} of a request with n = {len(self._choices)}")
        if out.get("prompt_logprobs"):
            self.prompt_logprobs = list(out["prompt_logprobs"])
        c = self._choices[index]
        c.text.append(out.get("text") or "")
        c.logprobs.extend(out.get("logprobs") or ())
        c.completion_tokens = out.get("completion_tokens") or c.completion_tokens
        if out.get("finish_reason") is not None:
            c.finish_reason = out["finish_reason"]

    @property
    def completion_tokens(self) -> int:
        """Generated tokens of all choices."""
        return sum(c.completion_tokens for c in self._choices)

    def body(self, prompt_tokens: int) -> dict[str, Any]:
        """The OpenAI body of the finished request."""
        choices = []
        for c in self._choices:
            text = "".join(c.text)
            logprobs = None
            if self.req.sampling.logprobs is not None:
                formatter = LogprobsFormatter(self.token_text, self.req.endpoint == "chat.completions",
                                              self.req.sampling.logprobs)
                entries = [*self.prompt_logprobs, *c.logprobs] if self.prompt_text is not None else c.logprobs
                logprobs = formatter.format(entries)
            if self.prompt_text is not None:
                text = self.prompt_text + text
            choices.append(chat_choice(self.req, text, c.finish_reason, logprobs))  # type: ignore[arg-type]
        scored = None
        if self.req.prompt_logprobs is not None:  # vLLM's field: per choice for completions, once for chat
            scored = vllm_prompt_logprobs(self.prompt_logprobs, self.token_text, self.req.prompt_logprobs)
        return choices_body(self.req, choices, prompt_tokens, self.completion_tokens, scored)
