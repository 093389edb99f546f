"""Text for the ONNX generator: chat templates rendered as transformers does, and each
prompt's new tokens decoded incrementally (the tokenizer's streaming decoder), so a
multi-byte character split across tokens is emitted once it is whole, with stop strings
held back until they can no longer begin."""
from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from typing import Sequence

# prompt tokens given to the streaming decoder before the first new token, so that
# decoders that drop a leading space on the first token (Metaspace) keep it
_STREAM_PRIMING_TOKENS = 4


def render_chat_template(template: str, messages: Sequence[dict], add_generation_prompt: bool, bos_token: str,
                         eos_token: str) -> str:
    """A conversation through a tokenizer config's chat template (jinja2, sandboxed, with
    transformers' filters and globals)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' filter: jinja's own escapes HTML characters and non-ASCII
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                            bos_token=bos_token, eos_token=eos_token)


@dataclass
class Row:
    """Per-prompt state of a running batch."""

    index: int  # position in the caller's list of prompts
    prompt: list[int]
    prime: list[int]  # the prompt's last tokens, which the streaming decoder starts from
    stream: object  # tokenizers.decoders.DecodeStream
    tokens: list[int] = field(default_factory=list)
    emitted: list[str] = field(default_factory=list)
    pending: str = ""  # decoded text held back because it may begin a stop string
    finish_reason: str | None = None
    token_times: list[float] = field(default_factory=list)  # perf_counter() at each new token


class TextStreamer:
    """Each row's text from its new tokens, with ``tokenizer`` (a tokenizers.Tokenizer):
    ``new_row``, then ``accept`` per token, then ``flush`` when the row is done."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def new_row(self, index: int, prompt: list[int]) -> Row:
        from tokenizers.decoders import DecodeStream

        # the streaming decoder starts from the prompt's last tokens, so that the first new
        # token's text (a leading space, say) reads as it would after the prompt; a window
        # that decodes to a replacement character (the prompt cut inside a multi-byte
        # character) would write prompt bytes into the text: shorten it, down to nothing
        prime = prompt[-_STREAM_PRIMING_TOKENS:]
        text = self.tokenizer.decode(prime, skip_special_tokens=True)
        while prime and text.startswith("\ufffd"):  # the window began inside a character
            prime = prime[1:]
            text = self.tokenizer.decode(prime, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            prime = []  # the prompt ends inside one (or with a literal U+FFFD: the same bytes out)
        return Row(index=index, prompt=prompt, prime=prime,
                    stream=DecodeStream(ids=prime, skip_special_tokens=True))

    def accept(self, row: Row, token: int, now: float, stop: tuple[str, ...], stream, eos: set[int]):
        """Record one new token of a row: its time, its text (when streaming or watching
        for stop strings; else flush decodes the tokens after the loop), EOS."""
        row.token_times.append(now)
        row.tokens.append(token)
        if token in eos:
            row.finish_reason = "eos"  # (a stop string the same token completes takes precedence)
        if stream is not None or stop:
            self.decode(row, token, stop, stream)

    def decode(self, row: Row, token: int, stop: tuple[str, ...], stream):
        """One token's text: the streaming decoder, stop strings, the text emitted."""
        piece = row.stream.step(self.tokenizer, token)
        if piece:
            row.pending += piece
        self.cut_at_stop(row, stop)
        if row.finish_reason is not None or not stop:
            hold = 0
        else:
            hold = max((k for s in stop for k in range(min(len(s) - 1, len(row.pending)), 0, -1)
                        if row.pending.endswith(s[:k])), default=0)
        ready = row.pending[:len(row.pending) - hold]
        row.pending = row.pending[len(row.pending) - hold:]
        if ready:
            row.emitted.append(ready)
            if stream is not None:
                stream(row.index, ready)

    @staticmethod
    def cut_at_stop(row: Row, stop: tuple[str, ...]):
        """Cut the held-back text before the first stop string in it (a stop string can only
        start there: earlier text was emitted only once no stop string could begin in it)."""
        if stop and row.pending:
            cut = min((i for i in (row.pending.find(s) for s in stop) if i >= 0), default=-1)
            if cut >= 0:
                row.pending = row.pending[:cut]
                row.finish_reason = "stop"

    def flush(self, row: Row, stream, stop: tuple[str, ...]):
        if stream is None and not stop:
            # the text was left for now: the same streaming decode, token by token, after
            # the loop (between two decode steps the model's weights have pushed the
            # tokenizer out of the caches: it cost more there than the decoding itself)
            for token in row.tokens:
                self.decode(row, token, stop, stream)
        if row.finish_reason != "stop" and row.tokens:
            # bytes the streaming decoder still holds (a character never completed, as a
            # random or cut-off model can leave) come out as the full decode writes them
            head = self.tokenizer.decode(row.prime, skip_special_tokens=True)
            full = self.tokenizer.decode(row.prime + row.tokens, skip_special_tokens=True)
            so_far = "".join(row.emitted) + row.pending
            if full.startswith(head) and full[len(head):].startswith(so_far):
                row.pending += full[len(head) + len(so_far):]
                self.cut_at_stop(row, stop)  # (a stop string of U+FFFD can be in those bytes' text)
        if row.pending:
            row.emitted.append(row.pending)
            if stream is not None:
                stream(row.index, row.pending)
            row.pending = ""
