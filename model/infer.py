"""Inference: batched greedy generation over (image, question) pairs.

Prompts are sorted by length and left-padded, so each batch wastes little compute on padding
and every row's new tokens start at the same position; the KV cache is on. A caller may pass
`should_stop` (a deadline, a shutdown, a client gone): it is polled before every batch and after
every generated token, and generation ends with `Stopped` once it says so.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import InternVLForConditionalGeneration, StoppingCriteria, StoppingCriteriaList

from medrega.grammar import IM_END
from model.processor import MedRegAProcessor


@dataclass(frozen=True)
class Query:
    image: Path | Image.Image
    question: str
    base_prompt: str | None = None


class Stopped(RuntimeError):
    """Generation was ended early because the caller's `should_stop` said so."""


class _StopWhen(StoppingCriteria):
    """Ends every row of the batch once `should_stop()` is true (checked after each token)."""

    def __init__(self, should_stop: Callable[[], bool]):
        self.should_stop = should_stop
        self.fired = False

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        self.fired = self.fired or bool(self.should_stop())
        return torch.full((input_ids.shape[0],), self.fired, dtype=torch.bool, device=input_ids.device)


class Generator:
    def __init__(self, model: InternVLForConditionalGeneration, processor: MedRegAProcessor):
        self.model = model.eval()
        self.processor = processor

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, dtype: torch.dtype = torch.float32) -> "Generator":
        model = InternVLForConditionalGeneration.from_pretrained(str(model_dir), dtype=dtype)
        return cls(model, MedRegAProcessor.from_pretrained(model_dir))

    def _pixels(self, image: Path | Image.Image) -> torch.Tensor:
        return self.processor.pixel_values(image) if isinstance(image, Image.Image) else self.processor.load_image(image)

    @torch.inference_mode()
    def generate(self, queries: list[Query], batch_size: int = 16, max_new_tokens: int = 64,
                 should_stop: Callable[[], bool] | None = None) -> list[str]:
        tok = self.processor.tokenizer
        encoded = [self.processor.encode_prompt(q.question, q.base_prompt) for q in queries]
        order = sorted(range(len(queries)), key=lambda i: len(encoded[i]))
        answers: list[str] = [""] * len(queries)
        device = self.model.device
        for start in range(0, len(order), batch_size):
            if should_stop is not None and should_stop():
                raise Stopped()
            rows = order[start:start + batch_size]
            width = max(len(encoded[i]) for i in rows)
            ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):  # left padding
                ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
                mask[r, width - len(encoded[i]):] = 1
            pixels = torch.stack([self._pixels(queries[i].image) for i in rows]).to(device, self.model.dtype)
            stop = _StopWhen(should_stop) if should_stop is not None else None
            out = self.model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), pixel_values=pixels,
                max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                pad_token_id=tok.pad_token_id, eos_token_id=self.processor.answer_end_id,
                stopping_criteria=StoppingCriteriaList([stop]) if stop is not None else None,
            )
            if stop is not None and stop.fired:
                raise Stopped()
            for r, i in enumerate(rows):
                answers[i] = tok.decode(out[r, width:], skip_special_tokens=False).split(IM_END)[0]
                answers[i] = answers[i].replace(tok.pad_token, "").strip()
        return answers
