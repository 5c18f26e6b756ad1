"""Processor: image -> normalised pixel tensor, record -> token ids with assistant-only labels.

Kept independent of transformers' InternVLProcessor, whose video half imports torchvision
(which does not load beside this torch build); the token layout is the same: one tile,
`<img>` + N `<IMG_CONTEXT>` + `</img>`, N = (image_size / patch_size)^2 * downsample_ratio^2.
Prompts are framed by the tokenizer's own chat template (medrega.grammar for the text inside).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedTokenizerFast

from medrega.grammar import IM_END, expand_image, user_text

IGNORE_INDEX = -100
CONFIG_NAME = "medrega_processor.json"
# InternViT was trained with ImageNet statistics; without normalisation nothing is learned.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ProcessorConfig:
    image_size: int
    num_image_tokens: int
    max_length: int
    system_prompt: str | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # Imported InternVL checkpoints (model/convert.py): a ps_version v1 model is converted to run on
    # the transposed image (its chat format lives in its tokenizer's chat template).
    transpose_image: bool = False


class TooLong(ValueError):
    """The prompt and answer do not fit into max_length tokens."""


class MedRegAProcessor:
    def __init__(self, tokenizer: PreTrainedTokenizerFast, config: ProcessorConfig):
        self.tokenizer = tokenizer
        self.config = config
        self._mean = torch.tensor(config.mean).view(3, 1, 1)
        self._std = torch.tensor(config.std).view(3, 1, 1)

    # -- images -------------------------------------------------------------------------
    def pixel_values(self, image: Image.Image) -> torch.Tensor:
        size = self.config.image_size
        image = image.convert("RGB").resize((size, size), Image.BICUBIC)
        array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        pixels = (array - self._mean) / self._std
        # Boxes stay on the original image's grid: the converted model answers as the v1 model does.
        return pixels.transpose(1, 2).contiguous() if self.config.transpose_image else pixels

    def load_image(self, path: str | Path) -> torch.Tensor:
        with Image.open(path) as image:
            return self.pixel_values(image)

    # -- text ---------------------------------------------------------------------------
    def prompt(self, question: str, base_prompt: str | None) -> str:
        """The full prompt up to and including the assistant header (generation starts after it)."""
        user = expand_image(user_text(question, base_prompt), self.config.num_image_tokens)
        system = [{"role": "system", "content": self.config.system_prompt}] if self.config.system_prompt else []
        return self.tokenizer.apply_chat_template(system + [{"role": "user", "content": user}], tokenize=False,
                                                  add_generation_prompt=True)

    @property
    def answer_end_id(self) -> int:
        """Where an answer ends (ChatML's turn end): the training target's last token, generation's stop."""
        return self.tokenizer.convert_tokens_to_ids(IM_END)

    def encode_prompt(self, question: str, base_prompt: str | None) -> list[int]:
        return self.tokenizer(self.prompt(question, base_prompt), add_special_tokens=False)["input_ids"]

    def encode_example(self, question: str, answer: str, base_prompt: str | None) -> dict[str, list[int]]:
        """Token ids and labels; only the answer (and its end token) carries loss."""
        prompt_ids = self.encode_prompt(question, base_prompt)
        answer_ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.answer_end_id]
        total = len(prompt_ids) + len(answer_ids)
        if total > self.config.max_length:
            # Never truncate silently: a cut answer teaches a wrong box.
            raise TooLong(f"{total} tokens > max_length {self.config.max_length}")
        return {
            "input_ids": prompt_ids + answer_ids,
            "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids,
        }

    # -- persistence --------------------------------------------------------------------
    def save_pretrained(self, out_dir: str | Path) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(out_dir))
        (out_dir / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2), encoding="utf-8")

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, max_length: int | None = None) -> "MedRegAProcessor":
        """`max_length` (the profile's) wins over the saved one."""
        model_dir = Path(model_dir)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(model_dir))
        tokenizer.padding_side = "left"
        raw = json.loads((model_dir / CONFIG_NAME).read_text(encoding="utf-8"))
        raw["mean"], raw["std"] = tuple(raw["mean"]), tuple(raw["std"])
        if max_length is not None:
            raw["max_length"] = max_length
        return cls(tokenizer, ProcessorConfig(**raw))
