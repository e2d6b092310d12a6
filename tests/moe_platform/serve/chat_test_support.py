"""A chat export for tests: the tiny random export plus a tokenizer_config.json with a chat template."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

# Turns end with eos (the only special token the tiny tokenizer has besides pad); the template
# refuses a conversation that opens with the assistant, as real templates do with raise_exception.
TEMPLATE = (
    "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('the first turn must not be the assistant') }}"
    "{% endif %}{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def write_chat_export(tiny_export: str, directory: Path, template: str = TEMPLATE) -> str:
    shutil.copytree(tiny_export, directory)
    config = {"chat_template": template, "bos_token": "", "eos_token": {"content": "<|endoftext|>"}}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return str(directory)
