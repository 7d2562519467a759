"""An adapter's own chat template (adapters/chat_template.py): where it is found, and what is
refused at registration rather than on every chat request."""

from __future__ import annotations

import json
import shutil

import pytest

from loraplex.adapters.chat_template import AdapterTemplate, read_chat_template
from loraplex.core.errors import InvalidAdapter

TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tokenizer_config(path, template=None, **extra):
    config = {"tokenizer_class": "GPT2Tokenizer", **extra}
    if template is not None:
        config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def test_chat_template_jinja_is_taken_before_tokenizer_config(tmp_path):
    (tmp_path / "chat_template.jinja").write_text(TEMPLATE)
    tokenizer_config(tmp_path, "{{ 'older' }}")
    found = read_chat_template(tmp_path)
    assert found == AdapterTemplate(TEMPLATE, "chat_template.jinja", ("tokenizer_config.json",))


@pytest.mark.parametrize(
    "template",
    [
        TEMPLATE,
        [{"name": "tool_use", "template": "{{ 1 }}"}, {"name": "default", "template": TEMPLATE}],
    ],
    ids=["string", "named"],
)
def test_the_template_in_tokenizer_config_is_taken(tmp_path, template):
    tokenizer_config(tmp_path, template)
    assert read_chat_template(tmp_path) == AdapterTemplate(TEMPLATE, "tokenizer_config.json", ())


def test_without_a_template_the_base_serves_and_tokenizer_config_is_ignored(tmp_path):
    assert read_chat_template(tmp_path) == AdapterTemplate("", "", ())
    tokenizer_config(tmp_path)
    assert read_chat_template(tmp_path) == AdapterTemplate("", "", ("tokenizer_config.json",))


def test_real_templates_compile(tmp_path, tokenizer_dir):
    """The embedded model's own template, and what transformers' environment adds to Jinja:
    the generation tag, loop controls, its globals (looked up only when rendered)."""
    shutil.copy(tokenizer_dir / "chat_template.jinja", tmp_path)
    assert read_chat_template(tmp_path).text == (tokenizer_dir / "chat_template.jinja").read_text()
    features = (
        "{%- set ns = namespace(n=0) -%}{% for m in messages %}{% if loop.index > 8 %}"
        "{% break %}{% endif %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
        "{% endgeneration %}{% elif m.role not in ('user', 'system') %}"
        "{{ raise_exception('roles are user, system or assistant') }}{% else %}"
        "{{ m | tojson(indent=2) }}{% endif %}{% endfor %}{{ strftime_now('%Y') }}"
    )
    (tmp_path / "chat_template.jinja").write_text(features)
    assert read_chat_template(tmp_path).text == features


@pytest.mark.parametrize(
    ("file", "content", "fragment"),
    [
        ("chat_template.jinja", "{% for m in messages %}{{ m }}", "not a valid Jinja template"),
        ("chat_template.jinja", "{{ m.content ", "not a valid Jinja template (line 1)"),
        ("chat_template.jinja", "{% exec 'rm -rf /' %}", "not a valid Jinja template"),
        ("chat_template.jinja", "{{ x | no_such_filter }}", "No filter named 'no_such_filter'"),
        ("chat_template.jinja", " \n", "chat template in chat_template.jinja is empty"),
        ("chat_template.jinja", b"\xff\xfe{{ x }}", "chat_template.jinja is not UTF-8 text"),
        ("tokenizer_config.json", "{not json", "tokenizer_config.json is not valid JSON"),
        ("tokenizer_config.json", "[]", "must hold a JSON object"),
        ("tokenizer_config.json", '{"chat_template": 7}', "chat_template must be a string"),
        (
            "tokenizer_config.json",
            '{"chat_template": [{"name": "tool_use", "template": "{{ 1 }}"}]}',
            "none named 'default'",
        ),
        (
            "tokenizer_config.json",
            json.dumps({"chat_template": "{{ x }}" * 10_000}),
            "70000 bytes, over the limit of 65536",
        ),
        ("tokenizer_config.json", json.dumps({"chat_template": "{% if %}"}), "not a valid"),
    ],
)
def test_a_template_that_cannot_serve_is_refused(tmp_path, file, content, fragment):
    path = tmp_path / file
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(InvalidAdapter) as err:
        read_chat_template(tmp_path)
    assert fragment in str(err.value) and file in str(err.value)


def test_a_template_nested_past_what_python_compiles_is_refused(tmp_path):
    (tmp_path / "chat_template.jinja").write_text("{% if x %}" * 3000 + "{% endif %}" * 3000)
    with pytest.raises(InvalidAdapter, match=r"chat_template\.jinja"):
        read_chat_template(tmp_path)


def test_a_template_is_compiled_never_rendered(tmp_path):
    """Registration only compiles: a template that would fail (or do anything) when rendered
    passes, and is refused by the request that renders it (tests/server/runtime)."""
    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('rendered!') }}")
    assert read_chat_template(tmp_path).text.startswith("{{ raise_exception")
