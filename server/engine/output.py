"""Per-sequence output processing: incremental detokenization and stop strings.

Text is released only when it is final: never half a UTF-8 character, and never the start of
what may become a stop string. So stream deltas always concatenate to the unary text.
"""

from __future__ import annotations

from dataclasses import dataclass

REPLACEMENT_CHAR = "\ufffd"  # the tokenizer's marker for bytes of an incomplete character


@dataclass
class StepText:
    delta: str
    stop_reason: str | None  # the stop string that matched on this token, if any


class OutputProcessor:
    def __init__(
        self,
        tokenizer: object,
        stop: tuple[str, ...],
        min_tokens: int = 0,
        include_stop: bool = False,
    ) -> None:
        self._tokenizer = tokenizer
        self._stop = stop
        self._min_tokens = min_tokens  # stop strings count from this many tokens on
        self._include_stop = include_stop  # the text keeps the stop string that ends it
        self._max_stop = max((len(s) for s in stop), default=0)
        self.token_ids: list[int] = []
        self.text = ""  # all completion text decoded so far (cut at a stop string)
        self._emitted = 0  # characters of self.text already released
        # Offsets into token_ids for incremental decoding: decoding a short window of recent
        # tokens keeps each step O(1) and lets byte-level merges across tokens resolve.
        self._prefix_offset = 0
        self._read_offset = 0

    def append(self, token_id: int) -> StepText:
        """Add one generated (non-EOS) token; returns the text that became final."""
        self.token_ids.append(token_id)
        return self._extend(self._decode_new(final=False), final=False)

    def render(self, token_id: int, ends: bool, at_limit: bool) -> StepText:
        """A sampled token's text: none of its own where it ends the sequence (end-of-sequence
        or a stop token: the text held back is released), else its decoded text, and all that
        is held back where the sequence reaches its limit (unless a stop string ended it
        first)."""
        if ends:
            return self.finish()
        step = self.append(token_id)
        if step.stop_reason is not None or not at_limit:
            return step
        rest = self.finish()
        return StepText(delta=step.delta + rest.delta, stop_reason=rest.stop_reason)

    def finish(self) -> StepText:
        """Release everything still held back (the sequence ends for another reason); a stop
        string completed by that last text still cuts it."""
        return self._extend(self._decode_new(final=True), final=True)

    def _extend(self, new_text: str, final: bool) -> StepText:
        start = max(0, len(self.text) - self._max_stop + 1)  # a stop may span old and new text
        self.text += new_text
        if self._stop and len(self.token_ids) >= self._min_tokens:
            hit = self._find_stop(start)
            if hit is not None:
                index, stop = hit
                self.text = self.text[: index + (len(stop) if self._include_stop else 0)]
                return StepText(delta=self._release(len(self.text)), stop_reason=stop)
        held = 0 if final else self._held_back()
        return StepText(delta=self._release(len(self.text) - held), stop_reason=None)

    def _decode_new(self, final: bool) -> str:
        decode = self._tokenizer.decode  # type: ignore[attr-defined]
        prefix = decode(
            self.token_ids[self._prefix_offset : self._read_offset], skip_special_tokens=True
        )
        full = decode(self.token_ids[self._prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and (final or not full.endswith(REPLACEMENT_CHAR)):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.token_ids)
            return full[len(prefix) :]
        return ""

    def _find_stop(self, start: int) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for stop in self._stop:
            index = self.text.find(stop, start)
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        return best

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        for k in range(min(self._max_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(stop.startswith(tail) for stop in self._stop):
                return k
        return 0

    def _release(self, upto: int) -> str:
        upto = max(upto, self._emitted)
        delta = self.text[self._emitted : upto]
        self._emitted = upto
        return delta
