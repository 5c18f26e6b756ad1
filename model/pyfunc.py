"""The MLflow model: image + question in, answer text + parsed regions (pixels) out.

Logged with this `model` package as code, so `mlflow.pyfunc.load_model(...)` needs only the
installed libraries, not the pipeline. Input rows: `image` (base64 PNG/JPEG, optionally as a
`data:` URL), `question`, optional `task` (picks the base prompt the model was tuned with).

Weights come in one of two layouts (params `register.weights`): `merged` (artifact `model`,
a full checkpoint) or `adapter` (artifacts `base` + `adapter`, merged in memory at load time).

Bad input raises MlflowException(INVALID_PARAMETER_VALUE): MLflow's scoring server turns that
into an HTTP 400 carrying our message, where any other exception would be a generic error.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
from pathlib import Path

import mlflow.pyfunc
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from PIL import Image

MAX_IMAGE_PIXELS = 40_000_000   # same bound as the validate stage
MAX_IMAGE_BYTES = 32 * 1024 * 1024
MAX_QUESTION_CHARS = 4000
MAX_ROWS = 64


class BadInput(MlflowException):
    """A request the model cannot answer; served as HTTP 400 with this message."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def decode_image(value) -> Image.Image:
    """A base64-encoded PNG/JPEG -> RGB image. Refuses oversized and decompression-bomb images.

    File paths are deliberately not accepted: a served model must not read the server's disk.
    """
    if not isinstance(value, str) or not value.strip():
        raise BadInput("image: missing or empty (expected a base64-encoded PNG or JPEG)")
    if value.startswith("data:"):
        value = value.split(",", 1)[-1]
    if len(value) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise BadInput(f"image: larger than {MAX_IMAGE_BYTES // (1024 * 1024)} MiB")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as err:
        raise BadInput("image: not valid base64") from err
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as err:  # PIL raises several types for undecodable data
        raise BadInput("image: not a readable image (expected PNG or JPEG)") from err
    # Check the header's size before decoding a single pixel: PIL itself only raises above
    # twice its limit, and a small compressed file can declare billions of pixels.
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise BadInput(f"image: {image.width}x{image.height} is more than {MAX_IMAGE_PIXELS} pixels")
    try:
        image.load()
    except Exception as err:
        raise BadInput(f"image: cannot be decoded ({type(err).__name__})") from err
    return image.convert("RGB")


def _question(value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadInput("question: missing or empty")
    if len(value) > MAX_QUESTION_CHARS:
        raise BadInput(f"question: longer than {MAX_QUESTION_CHARS} characters")
    return value


def load_generator(artifacts: dict[str, str]):
    """A Generator from either weight layout."""
    from model.infer import Generator

    if "adapter" in artifacts:
        from peft import PeftModel
        from transformers import InternVLForConditionalGeneration

        from model.processor import MedRegAProcessor

        base = InternVLForConditionalGeneration.from_pretrained(artifacts["base"])
        merged = PeftModel.from_pretrained(base, artifacts["adapter"]).merge_and_unload()
        return Generator(merged, MedRegAProcessor.from_pretrained(artifacts["adapter"]))
    return Generator.from_pretrained(artifacts["model"])


class MedRegAModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.generator = load_generator(context.artifacts)
        self.base_prompts = json.loads(Path(context.artifacts["base_prompts"]).read_text(encoding="utf-8"))
        self.max_new_tokens = int(self.base_prompts.pop("_max_new_tokens", 64))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from medrega.grammar import decode_box, parse_regions
        from model.infer import Query

        if not isinstance(model_input, pd.DataFrame):
            raise BadInput("input must be a table with columns image, question and optional task")
        for column in ("image", "question"):
            if column not in model_input.columns:
                raise BadInput(f"input is missing the field {column!r}")
        if len(model_input) > MAX_ROWS:
            raise BadInput(f"at most {MAX_ROWS} rows per request")
        images, queries = [], []
        for n, row in enumerate(model_input.to_dict("records")):
            try:
                image, question = decode_image(row["image"]), _question(row["question"])
            except BadInput as err:
                raise BadInput(f"row {n}: {err.message}") from None
            task = row.get("task")
            lang = "zh" if any("\u4e00" <= ch <= "\u9fff" for ch in question) else "en"
            prompt = (self.base_prompts.get(str(task)) or {}).get(lang) if isinstance(task, str) and task else None
            images.append(image)
            queries.append(Query(image, question, prompt))
        max_new = (params or {}).get("max_new_tokens") or self.max_new_tokens
        answers = self.generator.generate(queries, max_new_tokens=int(max_new))
        regions = []
        for image, answer in zip(images, answers):
            parsed = parse_regions(answer)
            regions.append(json.dumps([
                {"name": name, "box": [round(v, 1) for v in decode_box(box, image.width, image.height)]}
                for name, box in parsed.regions
            ], ensure_ascii=False))
        return pd.DataFrame({"answer": answers, "regions": regions})
