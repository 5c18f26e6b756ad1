"""Batched generation gives the same answers as one-at-a-time generation; the HTML report."""
import numpy as np
import pytest
from PIL import Image

from tests.conftest import tiny
from medrega.metrics import html
from medrega.metrics.scoring import Scorer, score_samples, summarise
from medrega.grammar import format_regions
from model.infer import Generator, Query
from model.presets import build_model
from model.processor import MedRegAProcessor, ProcessorConfig
from model.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def generator():
    cfg = tiny().model
    texts = ["What is <box>[[1, 2, 3, 4]]</box> in this CT scan? liver spleen heart 肝脏 脾脏"] * 20
    tok = train_tokenizer(texts, vocab_size=400, min_frequency=1)
    processor = MedRegAProcessor(tok, ProcessorConfig(image_size=cfg.image_size, num_image_tokens=cfg.num_image_tokens,
                                                      max_length=cfg.max_length))
    model = build_model(cfg, tok, seed=0)
    model.resize_token_embeddings(len(tok))
    return Generator(model, processor)


def test_batched_answers_equal_sequential_with_left_padding(generator):
    rng = np.random.default_rng(0)
    # prompts of different lengths, so batches carry left padding
    questions = ["liver?", "What is <box>[[10, 20, 300, 400]]</box> in this CT scan?", "肝脏", "spleen heart liver " * 3,
                 "What is this?", "<ref>heart</ref>"]
    queries = [Query(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), q) for q in questions]
    sequential = generator.generate(queries, batch_size=1, max_new_tokens=10)
    batched = generator.generate(queries, batch_size=4, max_new_tokens=10)
    assert batched == sequential
    assert any(a for a in sequential)  # a random model still writes something


def test_html_report_has_every_section_and_draws_boxes(tmp_path):
    image = tmp_path / "ct.png"
    Image.new("RGB", (100, 50)).save(image)
    gt = format_regions([("liver", [[0, 0, 499, 999]])])
    items = [
        {"task": "t2r", "image": str(image), "prediction": format_regions([("spleen", [[0, 0, 499, 999]])]),
         "ground_truth": gt, "width": 100, "height": 50, "lang": "en", "modality": "ct", "setting": "SS"},
        {"task": "r2t", "prediction": "heart", "ground_truth": "liver", "lang": "zh", "modality": "ct"},
    ]
    scorer = Scorer()
    samples = score_samples(items, scorer=scorer)
    page = html.render(summarise(samples, scorer), items, samples)
    for section in ("Headline", "By modality", "By language", "IoU distribution", "name confusions", "Gallery"):
        assert section in page
    assert page.count("data:image/png;base64,") == 1
    assert html.confusions(items, samples) == [("liver", "spleen", 1), ("liver", "heart", 1)]
    # ground truth in green, prediction in red, at the decoded pixel position
    import base64
    import io

    drawn = Image.open(io.BytesIO(base64.b64decode(html.draw(items[0])))).convert("RGB")
    assert drawn.getpixel((25, 0)) in (html.GT_COLOUR, html.PRED_COLOUR)
    assert drawn.getpixel((75, 25)) == (0, 0, 0)
