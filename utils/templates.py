"""Prompt templates as Jinja chat templates, so every tool that reads the tokenizer uses the same format.

Each template exists twice. The training form wraps assistant turns in `{% generation %}` blocks, so
`apply_chat_template(..., return_assistant_tokens_mask=True)` marks exactly the tokens the loss is computed
on (trl's convention: a separate training template); only 03_sft and 04_dpo use it. The inference form is
the same text without those tags, which transformers alone understands: it is what a checkpoint ships as
its tokenizer's `chat_template` (and what a GGUF export carries), so plain Jinja, llama.cpp and Ollama can
render it. The template's name is saved in `template.json`, so serving and evaluation format prompts the
same way.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import PreTrainedTokenizerBase

NL = "{{ '\\n' }}"
GENERATION_TAGS = ("{% generation %}", "{% endgeneration %}")

CHATML_TRAINING = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "<|im_start|>assistant" + NL + "{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}" + NL +
    "{%- else -%}"
    "<|im_start|>{{ message['role'] }}" + NL + "{{ message['content'] }}<|im_end|>" + NL +
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant" + NL + "{%- endif -%}"
)

INSTRUCT_TRAINING = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] }}" + NL + NL +
    "{%- elif message['role'] == 'user' -%}### Instruction:" + NL + "{{ message['content'] }}" + NL + NL +
    "### Response:" + NL +
    "{%- else -%}{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}" + NL + NL +
    "{%- endif -%}"
    "{%- endfor -%}"
)

CHAT_TRAINING = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] }}" + NL + NL +
    "{%- elif message['role'] == 'user' -%}Human: {{ message['content'] }}" + NL + NL + "Assistant:"
    # the reply's leading space as an expression: with the tags removed, a literal one would be eaten by `-%}`
    "{%- else -%}{% generation %}{{ ' ' }}{{ message['content'] }}{{ eos_token }}{% endgeneration %}" + NL + NL +
    "{%- endif -%}"
    "{%- endfor -%}"
)

TRAINING_TEMPLATES = {"chatml": CHATML_TRAINING, "instruct": INSTRUCT_TRAINING, "chat": CHAT_TRAINING}


def _without_generation_tags(template: str) -> str:
    for tag in GENERATION_TAGS:
        template = template.replace(tag, "")
    return template


# Derived rather than written out, so the two forms cannot drift apart.
TEMPLATES = {name: _without_generation_tags(template) for name, template in TRAINING_TEMPLATES.items()}
CHATML, INSTRUCT, CHAT = TEMPLATES["chatml"], TEMPLATES["instruct"], TEMPLATES["chat"]
TEMPLATE_FILE = "template.json"


def get_template(name: str) -> str:
    """The inference form of template `name` (plain Jinja)."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown prompt template {name!r}; valid templates: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def training_template(name: str) -> str:
    """The training form of template `name`: assistant turns in `{% generation %}` blocks."""
    get_template(name)
    return TRAINING_TEMPLATES[name]


def apply_template(tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    """Makes the training form of `name` the tokenizer's chat template, for the loss masks of 03/04; checkpoints
    are saved with the inference form instead (utils/tokenizer.py save_tokenizer)."""
    tokenizer.chat_template = training_template(name)


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
