"""Inference: batched greedy generation over (image, question) pairs, placed where the profile says.

Prompts are sorted by length and left-padded, so each batch wastes little compute on padding
and every row's new tokens start at the same position; the KV cache is on. The batches are a
plan (`batches`) computed from the prompts alone, so ranks that each generate a share of them
(model/recipes/generate.py) produce exactly the answers one process would. A caller may pass
`should_stop` (a deadline, a shutdown, a client gone): it is polled before every batch and after
every generated token, and generation ends with `Stopped` once it says so.

Placement (`placement`): on GPUs the weights load in `model.dtype`, the whole model on this rank's
GPU, or with `model.device_map: auto` spread by accelerate over the GPUs of the node that are this
rank's share; on a CPU-only machine in float32. A model that does not fit where it was put fails
loudly instead of spilling to CPU memory or disk.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import InternVLForConditionalGeneration, StoppingCriteria, StoppingCriteriaList

from medrega.errors import BadInput
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


def rank_gpus(count: int, local_rank: int, local_world: int, spread: bool) -> list[int]:
    """The GPUs of this node that are this local rank's: one each, or (`spread`, device_map auto)
    an equal contiguous share each, so the node's ranks never place weights on the same GPU."""
    if count < local_world:
        raise BadInput(f"{local_world} ranks on a node with {count} GPU(s): at most one rank per GPU "
                       "(lower the launcher's nproc_per_node)")
    if not spread:
        return [local_rank]
    share = count // local_world
    return list(range(local_rank * share, (local_rank + 1) * share))


def placement(dtype: str = "float32", device_map: str | None = None) -> dict:
    """`from_pretrained` keyword arguments that put the model where the profile says, for this
    rank (LOCAL_RANK / LOCAL_WORLD_SIZE from torchrun; one process otherwise)."""
    if not torch.cuda.is_available():
        # float32: bf16 on CPUs is slow and some kernels lack it. device_map auto still goes through
        # accelerate (which keeps everything on the CPU), so the same loading path runs everywhere.
        return {"dtype": torch.float32, **({"device_map": device_map} if device_map else {})}
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    gpus = rank_gpus(torch.cuda.device_count(), local_rank, local_world, spread=device_map is not None)
    if device_map is None:
        return {"dtype": getattr(torch, dtype), "device_map": {"": gpus[0]}}
    # only this rank's GPUs, and no "cpu"/"disk" entry: accelerate may not spill weights off them
    return {"dtype": getattr(torch, dtype), "device_map": device_map,
            "max_memory": {i: torch.cuda.mem_get_info(i)[0] for i in gpus}}


def check_placed(model: torch.nn.Module, where: str) -> None:
    """Refuse a model accelerate put (partly) on disk, or, on a GPU machine, in CPU memory:
    generation would crawl, or a GPU run would silently not be one."""
    mapped = set((getattr(model, "hf_device_map", None) or {}).values())  # set only when dispatched
    kinds = {p.device.type for p in model.parameters()}
    spilled = {"disk"} if "disk" in mapped or "meta" in kinds else set()
    if torch.cuda.is_available() and ("cpu" in mapped or "cpu" in kinds):
        spilled.add("cpu")
    if spilled:
        raise BadInput(f"{where}: the model does not fit this rank's devices (parts placed on "
                       f"{', '.join(sorted(spilled))}): give each rank more GPUs (fewer ranks per node with "
                       "model.device_map auto) or use a smaller model")


def batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices sorted by prompt length (ties in item order), cut into batches: a function of the
    prompts alone, so every rank computes the same plan."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


class Generator:
    def __init__(self, model: InternVLForConditionalGeneration, processor: MedRegAProcessor):
        self.model = model.eval()
        self.processor = processor

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, dtype: str = "float32", device_map: str | None = None) -> "Generator":
        """Load a model folder with the profile's `model.dtype` and `model.device_map` (`placement`)."""
        model = InternVLForConditionalGeneration.from_pretrained(str(model_dir), **placement(dtype, device_map))
        check_placed(model, str(model_dir))
        return cls(model, MedRegAProcessor.from_pretrained(model_dir))

    def encode(self, queries: list[Query]) -> list[list[int]]:
        return [self.processor.encode_prompt(q.question, q.base_prompt) for q in queries]

    def _pixels(self, image: Path | Image.Image) -> torch.Tensor:
        return self.processor.pixel_values(image) if isinstance(image, Image.Image) else self.processor.load_image(image)

    def generate(self, queries: list[Query], batch_size: int = 16, max_new_tokens: int = 64,
                 should_stop: Callable[[], bool] | None = None) -> list[str]:
        encoded = self.encode(queries)
        plan = batches([len(e) for e in encoded], batch_size)
        answers = self.generate_batches(queries, plan, max_new_tokens, should_stop, encoded)
        return [answers[i] for i in range(len(queries))]

    @torch.inference_mode()
    def generate_batches(self, queries: list[Query], plan: list[list[int]], max_new_tokens: int = 64,
                         should_stop: Callable[[], bool] | None = None,
                         encoded: list[list[int]] | None = None) -> dict[int, str]:
        """Answers of the queries the batches of `plan` name (indices into `queries`), by index."""
        tok = self.processor.tokenizer
        encoded = encoded if encoded is not None else self.encode(queries)
        answers: dict[int, str] = {}
        device = self.model.device
        for rows in plan:
            if should_stop is not None and should_stop():
                raise Stopped()
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
