"""The MLflow model: image + question in, answer text + parsed regions (pixels) out.

Logged with this `model` package as code, so `mlflow.pyfunc.load_model(...)` needs only the
installed libraries, not the pipeline. Input rows: `image` (base64 PNG/JPEG, optionally as a
`data:` URL), `question`, optional `task` (picks the base prompt the model was tuned with).

Weights come in one of three layouts (params `register.weights`): `merged` (artifact `model`,
a full checkpoint), `adapter` (artifacts `base` + `adapter`, merged in memory at load time) or
`reference` (artifact `weights_ref`: where the tuned checkpoint is on the DVC remote and its
hashes; `medrega.weights.fetch` fetches and verifies it before anything is built from it).
They are placed as evaluation places them (model.infer.placement): `dtype` and `device_map` come
from the model config MLflow passes to `load_context`, logged from the training profile and
overridden by whoever loads it (`medrega serve` and `predict` pass the active profile's).

Bad input raises MlflowException(INVALID_PARAMETER_VALUE): MLflow's scoring server and ours
(`model.serve`) turn that into an HTTP 400 carrying our message. The bounds are `model.limits`;
`answer()` is `predict()` with explicit limits and a stop callback, for the HTTP server.
"""
from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable
from pathlib import Path

import mlflow.pyfunc
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from PIL import Image

from medrega import grammar
from medrega.images import CORRUPT, FORMAT, TOO_LARGE, ImageRefused, open_image
from medrega.config import ServeConfig

DEFAULT_LIMITS = ServeConfig()

MAX_IMAGE_PIXELS = DEFAULT_LIMITS.max_image_pixels   # same bound as the validate stage
MAX_IMAGE_BYTES = DEFAULT_LIMITS.max_image_bytes
MAX_QUESTION_CHARS = DEFAULT_LIMITS.max_question_chars
MAX_ROWS = DEFAULT_LIMITS.max_rows
# Tokens a question may carry: Region-to-Text questions hold a <box>, Text-to-Region ones a <ref>.
# Every other added token (<IMG_CONTEXT>, <img>, <|im_start|>, ...) is refused: in user text it
# would forge the image or chat layout.
QUESTION_TOKENS = grammar.REGION_TOKENS


class BadInput(MlflowException):
    """A request the model cannot answer; served as HTTP 400 with this message."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


ACCEPTED = ("PNG", "JPEG")


def decode_image(value, limits: ServeConfig = DEFAULT_LIMITS) -> Image.Image:
    """A base64-encoded PNG/JPEG -> RGB image. Refuses other formats, oversized images and
    decompression bombs (by the size the header declares, before a pixel is decoded).

    File paths are deliberately not accepted: a served model must not read the server's disk.
    """
    if not isinstance(value, str) or not value.strip():
        raise BadInput("image: missing or empty (expected a base64-encoded PNG or JPEG)")
    if value.startswith("data:"):
        value = value.split(",", 1)[-1]
    if len(value) > limits.max_image_bytes * 4 // 3 + 4:
        raise BadInput(f"image: larger than {limits.max_image_bytes / (1024 * 1024):g} MiB")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadInput("image: not valid base64") from None
    if len(data) >= 132 and data[128:132] == b"DICM":
        raise BadInput("image: DICOM is not accepted (expected PNG or JPEG; `medrega predict` converts DICOM)")
    try:
        # the size the header declares is checked before a single pixel is decoded
        image = open_image(data, limits.max_image_pixels, formats=ACCEPTED)
    except ImageRefused as refused:
        if refused.reason in (TOO_LARGE, FORMAT):
            raise BadInput(f"image: {refused.detail}") from None
        if refused.reason == CORRUPT:
            raise BadInput("image: cannot be decoded (a truncated or corrupt PNG/JPEG)") from None
        raise BadInput("image: not a readable image (expected PNG or JPEG)") from None
    return image.convert("RGB")


def reserved_pattern(tokenizer) -> re.Pattern:
    """Every token the tokenizer splits out of raw text, except those a question may carry."""
    tokens = (set(tokenizer.get_added_vocab()) | set(grammar.SPECIAL_TOKENS)) - set(QUESTION_TOKENS)
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True) if t))


PLACEMENT_KEYS = {"dtype": ("float32", "bfloat16", "float16"), "device_map": (None, "auto")}


def placement_of(model_config: dict | None) -> dict:
    """`dtype` and `device_map` from the model config MLflow hands the model: logged with it
    (the training profile's) unless the loader passes its own (`medrega serve` / `predict`: the
    active profile's `model` section), so the served model places itself as evaluation does."""
    chosen = {"dtype": "float32", "device_map": None}
    chosen.update({k: v for k, v in (model_config or {}).items() if k in PLACEMENT_KEYS})
    for key, allowed in PLACEMENT_KEYS.items():
        if chosen[key] not in allowed:
            raise MlflowException(f"model_config.{key}: {chosen[key]!r} is not one of {list(allowed)}",
                                  error_code=INVALID_PARAMETER_VALUE)
    return chosen


def load_generator(artifacts: dict[str, str], model_config: dict | None = None):
    """A Generator from any of the weight layouts, placed per `placement_of(model_config)`."""
    from model.infer import Generator, check_placed, placement

    where = placement_of(model_config)
    if "weights_ref" in artifacts:
        from medrega import weights

        reference = json.loads(Path(artifacts["weights_ref"]).read_text(encoding="utf-8"))
        return Generator.from_pretrained(weights.fetch(reference), **where)
    if "adapter" in artifacts:
        from peft import PeftModel
        from transformers import InternVLForConditionalGeneration

        from model.processor import MedRegAProcessor

        base = InternVLForConditionalGeneration.from_pretrained(artifacts["base"], **placement(**where))
        check_placed(base, artifacts["base"])
        merged = PeftModel.from_pretrained(base, artifacts["adapter"]).merge_and_unload()
        return Generator(merged, MedRegAProcessor.from_pretrained(artifacts["adapter"]))
    return Generator.from_pretrained(artifacts["model"], **where)


class MedRegAModel(mlflow.pyfunc.PythonModel):
    limits: ServeConfig = DEFAULT_LIMITS  # in-process predict(); the HTTP server passes its own

    def load_context(self, context) -> None:
        self.placement = placement_of(getattr(context, "model_config", None))
        self.generator = load_generator(context.artifacts, self.placement)
        self.base_prompts = json.loads(Path(context.artifacts["base_prompts"]).read_text(encoding="utf-8"))
        self.max_new_tokens = int(self.base_prompts.pop("_max_new_tokens", 64))
        tokenizer = self.generator.processor.tokenizer
        self.reserved = reserved_pattern(tokenizer)
        self.reserved_ids = {tokenizer.convert_tokens_to_ids(t) for t in tokenizer.get_added_vocab()
                             if t not in QUESTION_TOKENS}

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        return self.answer(model_input, params)

    def _question(self, value, limits: ServeConfig) -> str:
        if not isinstance(value, str) or not value.strip():
            raise BadInput("question: missing or empty")
        if len(value) > limits.max_question_chars:
            raise BadInput(f"question: longer than {limits.max_question_chars} characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise BadInput("question: not valid Unicode text") from None
        found = self.reserved.search(value)
        if found:
            raise BadInput(f"question: contains the reserved token {found.group(0)} "
                           f"(a question may carry only {', '.join(QUESTION_TOKENS)})")
        # the same at the token level, whatever the tokenizer's normalisation does to the text
        ids = self.generator.processor.tokenizer(value, add_special_tokens=False)["input_ids"]
        if self.reserved_ids.intersection(ids):
            raise BadInput("question: contains a reserved token")
        return value

    def _base_prompt(self, task, question: str) -> str | None:
        if task is None or task is pd.NA or task == "" or (isinstance(task, float) and task != task):
            return None  # absent, empty or a table's missing value
        if not isinstance(task, str) or task.startswith("_") or task not in self.base_prompts:
            known = sorted(k for k in self.base_prompts if not k.startswith("_"))
            raise BadInput(f"task: must be one of {', '.join(known)} (or left out)")
        return (self.base_prompts.get(task) or {}).get(grammar.detect_lang(question))

    def _max_new(self, params: dict | None, limits: ServeConfig) -> int:
        value = (params or {}).get("max_new_tokens")
        integer = isinstance(value, int) and not isinstance(value, bool)
        if value is None or (integer and value == 0):
            return self.max_new_tokens  # 0 is the signature's default: the model's own
        if not integer or not 1 <= value <= limits.max_new_tokens:
            raise BadInput(f"max_new_tokens: must be an integer from 1 to {limits.max_new_tokens}")
        return int(value)

    def answer(self, model_input: pd.DataFrame, params: dict | None = None, limits: ServeConfig | None = None,
               should_stop: Callable[[], bool] | None = None) -> pd.DataFrame:
        """predict() with explicit limits. `should_stop` is polled between rows and after every
        generated token; once it returns True, model.infer.Stopped is raised."""
        from model.infer import Query, Stopped

        limits = limits or self.limits
        if not isinstance(model_input, pd.DataFrame):
            raise BadInput("input must be a table with columns image, question and optional task")
        for column in ("image", "question"):
            if column not in model_input.columns:
                raise BadInput(f"input is missing the field {column!r}")
        if len(model_input) == 0:
            raise BadInput("input has no rows")
        if len(model_input) > limits.max_rows:
            raise BadInput(f"at most {limits.max_rows} rows per request")
        max_new = self._max_new(params, limits)
        side = self.generator.processor.config.image_size
        sizes, queries = [], []
        for n, row in enumerate(model_input.to_dict("records")):
            if should_stop is not None and should_stop():
                raise Stopped()
            try:
                image, question = decode_image(row["image"], limits), self._question(row["question"], limits)
                prompt = self._base_prompt(row.get("task"), question)
            except BadInput as err:
                raise BadInput(f"row {n}: {err.message}") from None
            sizes.append(image.size)
            # keep only the model's input size (the processor resizes to it anyway): a request of
            # many large images never holds more than one of them decoded at full size
            queries.append(Query(image.resize((side, side), Image.BICUBIC), question, prompt))
            del image
        answers = self.generator.generate(queries, max_new_tokens=max_new, should_stop=should_stop)
        regions = []
        for (width, height), answer in zip(sizes, answers):
            parsed = grammar.parse_regions(answer)
            regions.append(json.dumps([
                {"name": name, "box": [round(v, 1) for v in grammar.decode_box(box, width, height)]}
                for name, box in parsed.regions
            ], ensure_ascii=False))
        return pd.DataFrame({"answer": answers, "regions": regions})
