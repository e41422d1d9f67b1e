"""What a generation asks for: ``GenerationParams``, and the checks on them, on the token ids
and on the chat messages a request sends (each a clear ``InvalidParamsError`` naming the field
and the fix)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gpu_prefix.errors import InvalidParamsError


@dataclass(frozen=True, kw_only=True, slots=True)
class GenerationParams:
    """What to generate. ``scope_salt`` comes from ``Engine.scope_salt_for(tenant)``, computed
    server-side from the authenticated tenant; ``None`` keeps the request out of the prefix
    cache altogether (it shares nothing, and stores no blocks nobody could match), so
    forgetting to pass one fails closed."""

    max_tokens: int = 16
    min_tokens: int = 0  # end-of-sequence is not sampled before this many tokens (benchmarks)
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    scope_salt: bytes | None = None
    adapter: str = ""
    use_prefix_cache: bool = True
    queue_timeout_s: float | None = None


def check_params(p: GenerationParams, *, max_tokens_limit: int) -> None:
    """Refuse parameters outside what the engine generates with (``InvalidParamsError``)."""
    if not isinstance(p.max_tokens, int) or p.max_tokens < 1:
        raise InvalidParamsError("max_tokens",
                                 f"must be a positive integer, got {p.max_tokens!r}",
                                 "use e.g. 16")
    if not 0 <= p.min_tokens <= p.max_tokens:
        raise InvalidParamsError("min_tokens",
                                 f"must be in [0, max_tokens], got {p.min_tokens}", "use 0")
    if p.max_tokens > max_tokens_limit:
        raise InvalidParamsError("max_tokens",
                                 f"{p.max_tokens} is over this engine's per-request budget of "
                                 f"{max_tokens_limit} tokens",
                                 f"ask for at most {max_tokens_limit}")
    if not 0.0 <= p.temperature <= 2.0:
        raise InvalidParamsError("temperature", f"must be in [0, 2], got {p.temperature}",
                                 "use 0 for greedy")
    if not 0.0 < p.top_p <= 1.0:
        raise InvalidParamsError("top_p", f"must be in (0, 1], got {p.top_p}", "use 1.0")
    if not 0 <= p.top_logprobs <= 20:
        raise InvalidParamsError("top_logprobs", f"must be in [0, 20], got {p.top_logprobs}",
                                 "use at most 20")
    if any(not isinstance(s, str) or not s for s in p.stop) or len(p.stop) > 4:
        raise InvalidParamsError("stop", "must be up to 4 non-empty strings",
                                 "send e.g. ['\\n\\n']")


def check_prompt(
    ids: Sequence[int], *, vocab_size: int, max_context: int, extra: int,
    field_name: str = "prompt_ids", allow_empty: bool = False
) -> list[int]:
    """``ids`` as a list of token ids of the vocabulary, with room for ``extra`` more tokens in
    the model's context."""
    try:
        out = list(map(int, ids))
    except (TypeError, ValueError):
        raise InvalidParamsError(field_name, "must be a list of integer token ids",
                                 "send token ids") from None
    if not out and not allow_empty:
        raise InvalidParamsError(field_name, "must not be empty", "send at least one token")
    if out and (min(out) < 0 or max(out) >= vocab_size):
        bad = [t for t in out if not 0 <= t < vocab_size]
        raise InvalidParamsError(field_name,
                                 f"token id {bad[0]} outside the vocabulary [0, "
                                 f"{vocab_size})", "send valid ids")
    if len(out) + extra > max_context:
        raise InvalidParamsError(
            field_name,
            f"{len(out)} tokens + {extra} more exceed the model's context of "
            f"{max_context}",
            "shorten the prompt or lower max_tokens",
        )
    return out


def check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Chat ``messages`` as the plain ``{role, content}`` text the engine's chat template takes
    (text parts joined, ``developer`` as ``system``); anything else is refused."""
    clean: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InvalidParamsError(f"messages[{i}]", "must be an object",
                                     "send {role, content}")
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant", "developer"):
            raise InvalidParamsError(
                f"messages[{i}].role", f"unsupported role {role!r}",
                "use system, user or assistant"
            )
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not (isinstance(part, Mapping) and part.get("type") == "text"
                        and isinstance(part.get("text"), str)):
                    raise InvalidParamsError(
                        f"messages[{i}].content[{j}]", "only text parts are supported",
                        "send {type: text, text}"
                    )
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise InvalidParamsError(f"messages[{i}].content", "must be a string",
                                     "send the message text")
        clean.append({"role": "system" if role == "developer" else role, "content": content})
    if not clean:
        raise InvalidParamsError("messages", "must not be empty", "send at least one message")
    return clean
