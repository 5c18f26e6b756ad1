"""The chat format: how a MedRegInstruct record becomes the model's prompt and target.

SPEC §1: training prepends "<image>\\n" + base_prompt + " " + question. The `<image>`
placeholder becomes `<img>` + N x `<IMG_CONTEXT>` + `</img>`, N being the image tokens per tile.
"""
from __future__ import annotations

from model.tokenizer import IMG_CONTEXT, IMG_END, IMG_START, IM_END, IM_START

IMAGE_PLACEHOLDER = "<image>"


def strip_image_placeholder(question: str) -> str:
    return question.replace(IMAGE_PLACEHOLDER + "\n", "", 1).replace(IMAGE_PLACEHOLDER, "", 1).strip()


def user_text(question: str, base_prompt: str | None) -> str:
    q = strip_image_placeholder(question)
    body = f"{base_prompt} {q}" if base_prompt else q
    return f"{IMAGE_PLACEHOLDER}\n{body}"


def prompt_text(question: str, base_prompt: str | None, num_image_tokens: int, system: str | None = None,
                *, separator: str = "\n", prefix: str = "") -> str:
    """The full prompt up to and including the assistant header (generation starts after it).

    `separator` follows each `<|im_end|>` (InternVL's Hermes-2 template uses none), `prefix` opens
    the prompt (a BOS token where the checkpoint's tokenizer adds one).
    """
    image = IMG_START + IMG_CONTEXT * num_image_tokens + IMG_END
    user = user_text(question, base_prompt).replace(IMAGE_PLACEHOLDER, image, 1)
    parts = [prefix]
    if system:
        parts.append(f"{IM_START}system\n{system}{IM_END}{separator}")
    parts.append(f"{IM_START}user\n{user}{IM_END}{separator}{IM_START}assistant\n")
    return "".join(parts)


def answer_text(answer: str) -> str:
    return answer + IM_END
