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
import re
import weakref
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
# template.json's name for "the tokenizer's own chat_template": a foreign model (one 03_sft started from a Hugging
# Face checkpoint that brought its own template) keeps it, and its checkpoints ship it as their chat_template.
NATIVE = "native"
GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
# tokenizer -> the inference form of its native template, while the training form is set on it (apply_template)
_NATIVE_INFERENCE: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, str] = weakref.WeakKeyDictionary()


def get_template(name: str) -> str:
    """The inference form of template `name` (plain Jinja); for `native` use `inference_template`."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown prompt template {name!r}; valid templates: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def training_template(name: str) -> str:
    """The training form of template `name`: assistant turns in `{% generation %}` blocks."""
    get_template(name)
    return TRAINING_TEMPLATES[name]


def is_project_template(chat_template: object) -> bool:
    """Whether `chat_template` is one of ours (either form): checkpoints of this pipeline carry one of them."""
    return chat_template in TEMPLATES.values() or chat_template in TRAINING_TEMPLATES.values()


def native_chat_template(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The tokenizer's own chat template, if it has one that is not ours (a named-variants dict: its default)."""
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if not template or is_project_template(template):
        return None
    return template


def native_training_template(tokenizer: PreTrainedTokenizerBase, template: str) -> tuple[str, str]:
    """The training form of a foreign chat template and where its loss goes: `assistant` or `all`.

    A template with `{% generation %}` blocks is its own training form. Otherwise trl's patched training
    version is used when trl knows the template (Qwen2.5/3, Llama 3, Gemma, Phi-3, ... in trl 1.16). A template
    trl cannot patch is wrapped in one generation block, so the loss covers every token of the conversation.
    """
    if GENERATION_MARKER.search(template):
        return template, "assistant"
    from trl.chat_template_utils import get_training_chat_template

    saved = tokenizer.chat_template
    tokenizer.chat_template = template
    try:
        patched = get_training_chat_template(tokenizer)
    except ValueError:  # trl: "patching is not supported for this template"
        patched = None
    except Exception:  # noqa: BLE001 - trl renders probe conversations; a template that fails them is not patched
        patched = None
    finally:
        tokenizer.chat_template = saved
    if patched:
        return patched, "assistant"
    return GENERATION_TAGS[0] + template + GENERATION_TAGS[1], "all"


def apply_template(tokenizer: PreTrainedTokenizerBase, name: str) -> str:
    """Makes the training form of `name` the tokenizer's chat template, for the loss masks of 03/04; checkpoints
    are saved with the inference form instead (utils/tokenizer.py save_tokenizer, via `inference_template`).

    `native` keeps the tokenizer's own (foreign) template and trains with its training form. Returns where the
    loss goes: `assistant` (the replies only) or `all` (a foreign template that marks no replies)."""
    if name != NATIVE:
        tokenizer.chat_template = training_template(name)
        return "assistant"
    own = _NATIVE_INFERENCE.get(tokenizer) or native_chat_template(tokenizer)
    if own is None:
        raise ValueError("the 'native' template needs a tokenizer with a chat template of its own; it has none")
    training, loss = native_training_template(tokenizer, own)
    _NATIVE_INFERENCE[tokenizer] = own
    tokenizer.chat_template = training
    return loss


def inference_template(tokenizer: PreTrainedTokenizerBase, name: str) -> str:
    """The chat template a checkpoint trained with template `name` ships (plain Jinja, no generation tags)."""
    if name != NATIVE:
        return get_template(name)
    own = _NATIVE_INFERENCE.get(tokenizer)
    if own is not None:
        return own
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise ValueError("the 'native' template needs a tokenizer with a chat template of its own; it has none")
    start, end = GENERATION_TAGS
    if template.startswith(start) and template.endswith(end):  # native_training_template's whole-text wrap
        return template[len(start):-len(end)]
    return template


def chat_template_text(name: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """What to render template `name` with: ours by name, or for `native` the tokenizer's own template."""
    return inference_template(tokenizer, name) if name == NATIVE else get_template(name)


def save_template_name(directory: str | Path, name: str) -> None:
    if name != NATIVE:
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
