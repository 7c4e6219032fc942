"""Chat messages: the `Message` type, the roles a conversation holds, and the one check of a message list.

Generation prompts, serving batch files, evaluation prompt files and SFT/DPO datasets all hold conversations as
`[{"role", "content"}, ...]`; every reader checks them here, so a bad role or content reads the same everywhere
and names where it was found.
"""

from __future__ import annotations

from typing import Any

Message = dict[str, str]
ROLES = ("system", "user", "assistant")
# Dataset spellings of the roles (ShareGPT's human/gpt, OpenAssistant's prompter, ...), matched lower-case.
ROLE_NAMES = {
    "user": "user", "human": "user", "prompter": "user",
    "assistant": "assistant", "ai": "assistant", "bot": "assistant", "gpt": "assistant",
    "system": "system",
}


class MessageError(ValueError):
    """A message list that is no conversation; the message names the item and field (after the caller's `where`)."""


def parse_role(name: Any, where: str, aliases: bool = False) -> str:
    """`name` as one of `ROLES`; with `aliases`, a dataset spelling from `ROLE_NAMES` (any case) is mapped too."""
    known = ROLE_NAMES if aliases else ROLES
    if aliases:
        role = ROLE_NAMES.get(name.strip().lower()) if isinstance(name, str) else None
    else:
        role = name if name in ROLES else None
    if role is None:
        raise MessageError(f"{where}: unknown role {name!r}; known roles: {', '.join(known)}")
    return role


def validate_messages(messages: Any, where: str = "messages") -> list[Message]:
    """A non-empty list of `{"role", "content"}` objects with known roles and string contents, as plain dicts
    (other keys dropped); `where` names the list in the error (a file and line, a request field)."""
    if not isinstance(messages, list) or not messages:
        raise MessageError(f"{where} must be a non-empty list of {{'role', 'content'}} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise MessageError(f"{where}[{i}] must be an object with 'role' and 'content'")
        parse_role(message.get("role"), f"{where}[{i}].role")
        if not isinstance(message.get("content"), str):
            raise MessageError(f"{where}[{i}].content must be a string")
    return [{"role": m["role"], "content": m["content"]} for m in messages]
