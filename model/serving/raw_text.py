"""Raw mode (the OpenAI-compatible API): the prompt exactly as sent, and the text a completion adds
kept as its tokens spell it, piece by piece.

The API returns, per token, its text and its offset in the whole text, so the pieces must join
into the text exactly: a character spelled over several tokens belongs to the token that
completes it, and bytes that never complete a character show as U+FFFD on the last token. Nothing
is cleaned (the page's rules, autocomplete.py, are not applied) and no token healing is done: the
prompt is tokenized as a whole, as OpenAI's API and the reference's `generate` do.
"""

from __future__ import annotations

from typing import Optional

from ..errors import BadRequest
from ..network.tokenizer import GPTTokenizer, complete_utf8_prefix
from .autocomplete import Prompt


def raw_prompt(tokenizer: GPTTokenizer, text: str, context: int, max_new_tokens: int,
               bos: Optional[int]) -> Prompt:
    """The prompt's tokens, all of them: BadRequest when they and the completion exceed the context.
    An empty prompt starts from the start-of-text token, as OpenAI's API does."""
    ids = tokenizer.encode(text) if text else []
    if not ids:
        if bos is None:
            raise BadRequest("the prompt is empty and this model has no start-of-text token")
        ids = [bos]
    if len(ids) + max_new_tokens > context:
        raise BadRequest(f"this model's maximum context length is {context:,} tokens, however you requested "
                         f"{len(ids) + max_new_tokens:,} tokens ({len(ids):,} in your prompt; {max_new_tokens:,} "
                         f"for the completion); shorten the prompt or max_tokens")
    return Prompt(ids, b"", "" if tokenizer.byte_level else tokenizer.decode(ids))


class PieceWriter:
    """Each token's share of the text as tokens come (one per row): byte-level tokenizers hold back
    a character's first bytes until its last; others take the growth of the decoded text."""

    def __init__(self, tokenizer: GPTTokenizer, prompt: Prompt):
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.held = b""

    def add(self, pieces: list, generated: list) -> None:
        """Append the piece of `generated[-1]` to `pieces` (the pieces of the tokens before it)."""
        tok = self.tokenizer
        if tok.byte_level:
            self.held += tok.token_bytes(generated[-1])
            done = complete_utf8_prefix(self.held)
            self.held = self.held[len(done):]
            pieces.append(done.decode("utf-8", errors="replace"))
            return
        so_far = "".join(pieces)
        full = tok.decode(self.prompt.tokens + generated)
        full = full[len(self.prompt.text_prefix):] if full.startswith(self.prompt.text_prefix) else full
        pieces.append(full[len(so_far):] if full.startswith(so_far) else tok.decode(generated[-1:]))

    def finish(self, pieces: list) -> None:
        """The row has ended: bytes that never completed a character go, as U+FFFD, to the last piece."""
        if self.held and pieces:
            pieces[-1] += self.held.decode("utf-8", errors="replace")
        self.held = b""


def token_text(tokenizer: GPTTokenizer, token: int) -> str:
    """One token alone, as text (an alternative in `top_logprobs`): a share of a character shows as U+FFFD."""
    if tokenizer.byte_level:
        return tokenizer.token_bytes(token).decode("utf-8", errors="replace")
    return tokenizer.decode([token])


def token_pieces(tokenizer: GPTTokenizer, ids: list[int]) -> list[str]:
    """Each token's share of the text of `ids` (a prompt), by the same rule."""
    writer, pieces = PieceWriter(tokenizer, Prompt([], b"", "")), []
    for i in range(len(ids)):
        writer.add(pieces, ids[: i + 1])
    writer.finish(pieces)
    return pieces
