"""Prompt templates as Jinja chat templates, so every tool that reads the tokenizer uses the same format.

Assistant turns are wrapped in `{% generation %}` blocks: `apply_chat_template(...,
return_assistant_tokens_mask=True)` then marks exactly the tokens the loss is computed on, for every
template. The template chosen at SFT time is saved as the checkpoint tokenizer's `chat_template`, and its
name in `template.json`, so serving and evaluation format prompts the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import PreTrainedTokenizerBase

NL = "{{ '\\n' }}"

CHATML = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "<|im_start|>assistant" + NL + "{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}" + NL +
    "{%- else -%}"
    "<|im_start|>{{ message['role'] }}" + NL + "{{ message['content'] }}<|im_end|>" + NL +
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant" + NL + "{%- endif -%}"
)

INSTRUCT = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] }}" + NL + NL +
    "{%- elif message['role'] == 'user' -%}### Instruction:" + NL + "{{ message['content'] }}" + NL + NL +
    "### Response:" + NL +
    "{%- else -%}{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}" + NL + NL +
    "{%- endif -%}"
    "{%- endfor -%}"
)

CHAT = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] }}" + NL + NL +
    "{%- elif message['role'] == 'user' -%}Human: {{ message['content'] }}" + NL + NL + "Assistant:"
    "{%- else -%}{% generation %} {{ message['content'] }}{{ eos_token }}{% endgeneration %}" + NL + NL +
    "{%- endif -%}"
    "{%- endfor -%}"
)

TEMPLATES = {"chatml": CHATML, "instruct": INSTRUCT, "chat": CHAT}
TEMPLATE_FILE = "template.json"


def get_template(name: str) -> str:
    if name not in TEMPLATES:
        raise ValueError(f"unknown prompt template {name!r}; valid templates: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def apply_template(tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    """Makes template `name` the tokenizer's chat template (saved with it by `save_pretrained`)."""
    tokenizer.chat_template = get_template(name)


def save_template_name(directory: str | Path, name: str) -> None:
    get_template(name)
    Path(directory, TEMPLATE_FILE).write_text(json.dumps({"template": name}) + "\n", encoding="utf-8")


def load_template_name(directory: str | Path) -> str:
    """The template a checkpoint was fine-tuned with; `chatml` for checkpoints that never were."""
    path = Path(directory, TEMPLATE_FILE)
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))["template"]
    return "chatml"


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end an assistant turn in any of our templates."""
    ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    return sorted(i for i in ids if i is not None and i != tokenizer.unk_token_id)
