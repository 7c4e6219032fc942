"""The front end of generation: prompts in, completions out, for serving (all three modes) and evaluation.

A prompt is plain text (completed as is) or a message list formatted with a chat template (`encode_prompt`);
`generate`, `generate_stream` and `generate_batch` run it through the decode engine (`utils.decoding`), and
`ChatSession` keeps a conversation inside the context window. Loading a checkpoint is `utils.loading`'s.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from utils.decoding import (
    BatchDecoder,
    ContextLengthError,
    GenerationError,
    GenerationResult,
    GenerationSettings,
    SequenceState,
    StreamEvent,
    check_fits,
)
from utils.messages import Message, MessageError, validate_messages
from utils.templates import chat_template_text

Prompt = str | list[Message]


# --------------------------------------------------------------------------- prompts


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, template: str | None = None) -> list[int]:
    """Token ids for a prompt.

    A string without a template is plain completion (raw text, no special tokens; an empty string starts
    a new document after EOS, as in pretraining). A string with a template is one user turn. A message
    list uses `template` or else the tokenizer's own chat template. Control tokens typed inside messages
    are encoded as plain text, so user content cannot forge a turn boundary.
    """
    if isinstance(prompt, str) and template is None:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return ids or [tokenizer.eos_token_id]
    try:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else validate_messages(prompt)
    except MessageError as err:
        raise GenerationError(str(err)) from None
    chat_template = chat_template_text(template, tokenizer) if template else tokenizer.chat_template
    if not chat_template:
        raise GenerationError("this tokenizer has no chat template: pass a template name (chatml, instruct, chat)")
    return list(
        tokenizer.apply_chat_template(
            messages, chat_template=chat_template, add_generation_prompt=True, tokenize=True, return_dict=False,
            sanitize_control_tokens=True,
        )
    )


# --------------------------------------------------------------------------- entry points


def _run(decoder: BatchDecoder, sequences: list[SequenceState]) -> None:
    pending = list(sequences)
    while pending or len(decoder):
        while pending and decoder.has_room:
            decoder.add(pending.pop(0))
        decoder.step()


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_or_messages: Prompt,
    settings: GenerationSettings | None = None,
    template: str | None = None,
) -> GenerationResult:
    """Generates one completion (see `encode_prompt` for how the prompt is formatted)."""
    events = list(generate_stream(model, tokenizer, prompt_or_messages, settings, template))
    return events[-1].result


def generate_stream(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_or_messages: Prompt,
    settings: GenerationSettings | None = None,
    template: str | None = None,
) -> Iterator[StreamEvent]:
    """Like `generate`, yielding text as it is produced; the last event carries the `GenerationResult`.

    Closing the iterator early (break, Ctrl-C) simply stops decoding.
    """
    settings = settings or GenerationSettings()
    decoder = BatchDecoder(model, tokenizer, max_batch_size=1)
    events: list[StreamEvent] = []
    seq = decoder.new_sequence(encode_prompt(tokenizer, prompt_or_messages, template), settings, events.append)
    decoder.add(seq)
    while True:
        yield from events
        events.clear()
        if seq.result is not None:
            return
        decoder.step()


def generate_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    settings: GenerationSettings | Sequence[GenerationSettings] | None = None,
    template: str | None = None,
    max_batch_size: int = 8,
) -> list[GenerationResult]:
    """Generates for many prompts, `max_batch_size` decoded together; results in prompt order.

    With greedy or seeded settings each result equals what `generate` returns for that prompt alone (up to
    float rounding differences between batched and single matrix products).
    """
    settings = settings or GenerationSettings()
    per_prompt = list(settings) if isinstance(settings, Sequence) else [settings] * len(prompts)
    if len(per_prompt) != len(prompts):
        raise GenerationError(f"got {len(per_prompt)} settings for {len(prompts)} prompts")
    decoder = BatchDecoder(model, tokenizer, max_batch_size=max_batch_size)
    sequences = []
    for i, (prompt, s) in enumerate(zip(prompts, per_prompt)):
        try:
            sequences.append(decoder.new_sequence(encode_prompt(tokenizer, prompt, template), s))
        except GenerationError as err:
            raise GenerationError(f"prompt {i}: {err}") from None
    _run(decoder, sequences)
    return [seq.result for seq in sequences]


# --------------------------------------------------------------------------- conversations


class ChatSession:
    """A conversation kept inside the context window: when it no longer fits, the oldest turns go first.

    With `template=None` (a base checkpoint) there is no conversation: each input is completed on its own.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, template: str | None, window: int, system: str = ""):
        self.tokenizer = tokenizer
        self.template = template
        self.window = window
        self.system = system
        self.turns: list[tuple[str, str]] = []  # (user, assistant)

    @property
    def chat(self) -> bool:
        return self.template is not None

    def reset(self) -> None:
        self.turns.clear()

    def messages(self, user: str, turns: list[tuple[str, str]] | None = None) -> list[Message]:
        turns = self.turns if turns is None else turns
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for past_user, past_reply in turns:
            messages += [{"role": "user", "content": past_user}, {"role": "assistant", "content": past_reply}]
        return messages + [{"role": "user", "content": user}]

    def prompt(self, user: str, max_new_tokens: int) -> tuple[Prompt, int]:
        """The prompt for the next reply and how many old turns were dropped to fit it in the window."""
        if not self.chat:
            check_fits(len(encode_prompt(self.tokenizer, user)), max_new_tokens, self.window)
            return user, 0
        for dropped in range(len(self.turns) + 1):
            messages = self.messages(user, self.turns[dropped:])
            length = len(encode_prompt(self.tokenizer, messages, self.template))
            if length + max_new_tokens <= self.window:
                del self.turns[:dropped]
                return messages, dropped
        raise ContextLengthError(length, max_new_tokens, self.window)

    def record(self, user: str, reply: str) -> None:
        if self.chat:
            self.turns.append((user, reply))
