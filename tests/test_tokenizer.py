"""Tokenizer: errors, template rendering details, and parity with transformers on SmolLM2."""

from __future__ import annotations

import json
import re
import shutil

import jinja2
import pytest

from replicas.model.errors import CheckpointError
from replicas.model.tokenizer import Tokenizer, validate_messages


@pytest.fixture
def tiny_copy(tiny_checkpoint_factory, tmp_path):
    """A private, editable copy of a tiny llama checkpoint."""
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint_factory("llama"), dst)
    return dst


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del data[key]
    path.write_text(json.dumps(data))


def test_missing_tokenizer_json(tiny_copy):
    (tiny_copy / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_dir(tiny_copy)


def test_corrupt_files_are_named(tiny_copy):
    (tiny_copy / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_dir(tiny_copy)


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("tokenizer_config.json", "[1, 2]", "tokenizer_config.json: expected a JSON object"),
        ("tokenizer_config.json", "{", "tokenizer_config.json: not valid JSON"),
        ("generation_config.json", '{"eos_token_id": "x"}', "generation_config.json: field 'eos_token_id'"),
        ("config.json", '{"eos_token_id": [2, -1]}', "config.json: field 'eos_token_id'"),
        ("tokenizer_config.json", '{"add_bos_token": "yes"}', "field 'add_bos_token'"),
        ("tokenizer_config.json", '{"eos_token": "<nope>"}', "field 'eos_token'"),
        ("tokenizer_config.json", '{"chat_template": 3}', "field 'chat_template'"),
        ("generation_config.json", '{"eos_token_id": 100000}', "generation_config.json: field 'eos_token_id'"),
    ],
)
def test_invalid_side_files(tiny_copy, name, content, match):
    (tiny_copy / name).write_text(content)
    with pytest.raises(CheckpointError, match=match):
        Tokenizer.from_dir(tiny_copy)


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}], "messages[1].role"),
        ([{"content": "hi"}], "messages[0].role"),
        ([{"role": "user", "content": 3}], "messages[0].content"),
        ([{"role": "user"}], "messages[0].content"),
        (["hello"], "messages[0]"),
        ([], "messages"),
        ("hello", "messages"),
    ],
)
def test_bad_messages_name_the_field(tiny_checkpoint_factory, messages, field):
    tok = Tokenizer.from_dir(tiny_checkpoint_factory("llama"))
    with pytest.raises(ValueError, match="^" + re.escape(field)):
        tok.apply_chat_template(messages)
    with pytest.raises(ValueError, match="^" + re.escape(field)):
        validate_messages(messages)


def test_missing_chat_template(tiny_copy):
    _edit_json(tiny_copy / "tokenizer_config.json", chat_template=None)
    tok = Tokenizer.from_dir(tiny_copy)
    assert tok.chat_template is None
    assert tok.encode("plain text still works")
    with pytest.raises(CheckpointError, match="chat_template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_jinja_file_preferred_and_template_features(tiny_copy):
    (tiny_copy / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}\n"
        "  {% set r = m['role'] %}[{{ r }}] {{ m['content'] | tojson }}{{ eos_token }}\n"
        "{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    )
    tok = Tokenizer.from_dir(tiny_copy)
    msgs = [{"role": "user", "content": 'a "q"'}]
    # trim_blocks / lstrip_blocks like transformers
    assert tok.apply_chat_template(msgs) == '<|endoftext|>[user] "a \\"q\\""<|im_end|>\n>'
    assert tok.apply_chat_template(msgs, add_generation_prompt=False).endswith("<|im_end|>\n")
    with pytest.raises(jinja2.TemplateError, match="no system role"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])


def test_template_list_form_and_special_token_dicts(tiny_copy):
    _edit_json(
        tiny_copy / "tokenizer_config.json",
        chat_template=[{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ eos_token }}"}],
        eos_token={"content": "<|im_end|>", "special": True},
    )
    tok = Tokenizer.from_dir(tiny_copy)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "D<|im_end|>"


def test_eos_and_bos_sources(tiny_copy):
    _edit_json(tiny_copy / "generation_config.json", eos_token_id=7)
    _edit_json(tiny_copy / "config.json", eos_token_id=[9, 7])
    _edit_json(tiny_copy / "tokenizer_config.json", add_bos_token=True)
    tok = Tokenizer.from_dir(tiny_copy)
    assert tok.eos_token_ids == (7, 9, tok.token_to_id("<|im_end|>"))
    bos = tok.bos_token_id
    assert bos == tok.token_to_id("<|endoftext|>")
    assert tok.encode("hello", add_special_tokens=True) == [bos, *tok.encode("hello")]
    assert tok.encode("<|endoftext|>hello", add_special_tokens=True)[0] == bos
    assert tok.encode("<|endoftext|>hello", add_special_tokens=True).count(bos) == 1


def test_minimal_directory(tiny_copy):
    for name in ("tokenizer_config.json", "generation_config.json", "config.json"):
        (tiny_copy / name).unlink()
    tok = Tokenizer.from_dir(str(tiny_copy))
    assert tok.eos_token_ids == () and tok.bos_token_id is None and tok.chat_template is None
    assert tok.decode(tok.encode("hello there")) == "hello there"


@pytest.mark.slow
def test_smollm2_matches_transformers(default_model_dir):
    from transformers import AutoTokenizer

    ours, ref = Tokenizer.from_dir(default_model_dir), AutoTokenizer.from_pretrained(default_model_dir)
    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Hi <|im_end|> there\n\n  spaces"},
            {"role": "assistant", "content": "Hello! ✓ 日本語 émoji 🙂"},
            {"role": "user", "content": "Count: 1 22 333 4444"},
        ],
    ]
    for msgs in conversations:
        for gen in (True, False):
            expected = ref.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True)
            expected = expected["input_ids"] if not isinstance(expected, list) else expected
            assert ours.encode_chat(msgs, add_generation_prompt=gen) == list(expected)
            assert ours.apply_chat_template(msgs, gen) == ref.apply_chat_template(
                msgs, add_generation_prompt=gen, tokenize=False
            )
    im_end = ours.token_to_id("<|im_end|>")
    assert im_end is not None and im_end in ours.eos_token_ids
    assert ours.vocab_size == len(ref) and ours.bos_token_id == ref.bos_token_id
    text = "The capital of France is Paris."
    assert ours.encode(text) == ref(text, add_special_tokens=False)["input_ids"]
    assert ours.decode([*ours.encode(text), im_end]) == text
