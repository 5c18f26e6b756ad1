"""The MLflow model: image + question in, answer text + parsed regions (pixels) out.

Logged with this `model` package as code, so `mlflow.pyfunc.load_model(...)` needs only the
installed libraries, not the pipeline. Input rows: `image` (base64 PNG/JPEG or a file path),
`question`, optional `task` (picks the base prompt the model was tuned with).
"""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import mlflow.pyfunc
import pandas as pd
from PIL import Image

MAX_IMAGE_PIXELS = 40_000_000


def decode_image(value: str) -> Image.Image:
    """A base64-encoded image, or a path to one; refuses decompression bombs."""
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    if len(value) < 4096 and Path(value).is_file():
        data = Path(value).read_bytes()
    else:
        try:
            data = base64.b64decode(value, validate=True)
        except ValueError as err:
            raise ValueError("image: neither a readable file path nor valid base64") from err
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Image.DecompressionBombError as err:
        raise ValueError(f"image: larger than {MAX_IMAGE_PIXELS} pixels") from err
    except Exception as err:  # PIL raises several types for undecodable data
        raise ValueError(f"image: cannot be decoded ({err})") from err
    return image.convert("RGB")


class MedRegAModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from model.infer import Generator

        self.generator = Generator.from_pretrained(context.artifacts["model"])
        self.base_prompts = json.loads(Path(context.artifacts["base_prompts"]).read_text(encoding="utf-8"))
        self.max_new_tokens = int(self.base_prompts.pop("_max_new_tokens", 64))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from model.boxes import decode_box, parse_regions
        from model.infer import Query

        for column in ("image", "question"):
            if column not in model_input.columns:
                raise ValueError(f"input is missing the column {column!r}")
        images, queries = [], []
        for _, row in model_input.iterrows():
            image = decode_image(str(row["image"]))
            task = row.get("task") if "task" in model_input.columns else None
            lang = "zh" if any("\u4e00" <= ch <= "\u9fff" for ch in str(row["question"])) else "en"
            prompt = (self.base_prompts.get(str(task)) or {}).get(lang) if task else None
            images.append(image)
            queries.append(Query(image, str(row["question"]), prompt))
        answers = self.generator.generate(queries, max_new_tokens=int((params or {}).get("max_new_tokens", self.max_new_tokens)))
        regions = []
        for image, answer in zip(images, answers):
            parsed = parse_regions(answer)
            regions.append(json.dumps([
                {"name": name, "box": [round(v, 1) for v in decode_box(box, image.width, image.height)]}
                for name, box in parsed.regions
            ], ensure_ascii=False))
        return pd.DataFrame({"answer": answers, "regions": regions})
