"""Model-metric plug-ins (issue 7): BERTScore on a tiny local BERT, CheXbert's loading contract
and label F1, and "not computed" when nothing is asked for (RadGraph: test_radgraph_plugin.py).
Nothing downloads: the models are built from configs in a tmp dir."""
import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from typer.testing import CliRunner  # noqa: E402

from cli import app  # noqa: E402
from medrega.metrics import plugins  # noqa: E402
from medrega.metrics.scoring import NOT_COMPUTED, score_answers  # noqa: E402

CORPUS = [
    "the heart size is normal", "no pleural effusion or pneumothorax", "the lungs are clear",
    "mild cardiomegaly with small bilateral effusions", "there is a right lower lobe opacity",
    "degenerative changes of the spine", "support devices in place", "no acute cardiopulmonary process",
]


def _tokenizer(directory):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]", model_max_length=64)
    fast.save_pretrained(directory)
    return fast


def _config(vocab_size):
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from transformers import BertModel

    d = tmp_path_factory.mktemp("tiny-bert")
    tok = _tokenizer(d)
    torch.manual_seed(0)
    BertModel(_config(len(tok))).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_chexbert(tmp_path_factory):
    """A checkpoint laid out like the released chexbert.pth (DataParallel `module.` keys under
    `model_state_dict`); head 1 (Cardiomegaly) always says positive, the others never do."""
    from transformers import BertModel

    d = tmp_path_factory.mktemp("tiny-chexbert")
    tok = _tokenizer(d)
    config = _config(len(tok))
    config.save_pretrained(d)
    torch.manual_seed(0)
    bert = BertModel(config)
    state = {f"module.bert.{k}": v for k, v in bert.state_dict().items()}
    for i in range(14):
        w = torch.zeros(2 if i == 13 else 4, 32)
        b = torch.zeros(2 if i == 13 else 4)
        b[1 if i == 1 else 0] = 10.0
        state[f"module.linear_heads.{i}.weight"], state[f"module.linear_heads.{i}.bias"] = w, b
    torch.save({"epoch": 1, "model_state_dict": state}, d / "chexbert.pth")
    return d


# -- BERTScore -----------------------------------------------------------------------------------

def test_bertscore_identical_texts_score_one(tiny_bert):
    bs = plugins.BERTScore(tiny_bert, batch_size=2)
    texts = ["the heart size is normal", "no pleural effusion", "mild cardiomegaly", "lungs are clear"]
    for s in bs.score(texts, texts):
        assert s["precision"] == pytest.approx(1.0, abs=1e-5)
        assert s["recall"] == pytest.approx(1.0, abs=1e-5)
        assert s["f1"] == pytest.approx(1.0, abs=1e-5)


def test_bertscore_swapping_sides_swaps_precision_and_recall(tiny_bert):
    bs = plugins.BERTScore(tiny_bert, batch_size=3)
    a = ["the heart size is normal", "no pleural effusion or pneumothorax", "support devices"]
    b = ["heart normal", "there is a right lower lobe opacity", "support devices in place"]
    ab, ba = bs.score(a, b), bs.score(b, a)
    for x, y in zip(ab, ba):
        assert x["precision"] == pytest.approx(y["recall"], abs=1e-6)
        assert x["recall"] == pytest.approx(y["precision"], abs=1e-6)
        assert x["f1"] == pytest.approx(y["f1"], abs=1e-6)
        assert -1.0 <= x["f1"] <= 1.0 + 1e-6


def test_bertscore_batching_layer_and_idf(tiny_bert):
    a = ["the heart size is normal", "no pleural effusion", "lungs clear", "spine"]
    b = ["heart normal", "effusion", "the lungs are clear", "degenerative changes of the spine"]
    one = plugins.BERTScore(tiny_bert, batch_size=1).score(a, b)
    many = plugins.BERTScore(tiny_bert, batch_size=4).score(a, b)
    for x, y in zip(one, many):  # padding in a batch does not change a score
        assert x["f1"] == pytest.approx(y["f1"], abs=1e-5)
    assert plugins.BERTScore(tiny_bert, layer=1).score(a[:1], a[:1])[0]["f1"] == pytest.approx(1.0, abs=1e-5)
    idf = plugins.BERTScore(tiny_bert, idf=True)
    assert idf.score(a, a)[0]["f1"] == pytest.approx(1.0, abs=1e-5)
    assert idf.score(["", "x"], ["heart", ""])[0] == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    with pytest.raises(plugins.PluginError, match="layer"):
        plugins.BERTScore(tiny_bert, layer=7)


def test_bertscore_idf_from_other_texts_and_the_release_protocol(tiny_bert):
    from medrega.metrics import release

    a = ["the heart size is normal", "no pleural effusion", "lungs clear"]
    b = ["heart normal", "effusion", "the lungs are clear"]
    # idf from `a` while scoring a against b = the idf option (idf from the references, a) with sides swapped
    mine = plugins.BERTScore(tiny_bert).score(a, b, idf_from=a)
    swapped = plugins.BERTScore(tiny_bert, idf=True).score(b, a)
    for x, y in zip(mine, swapped):
        assert x["precision"] == pytest.approx(y["recall"], abs=1e-6)
        assert x["recall"] == pytest.approx(y["precision"], abs=1e-6)
    bs = plugins.BERTScore(tiny_bert)
    r = release.r2t([{"pred_answer": t, "gt_answer": t} for t in a], bertscore=bs)
    assert r["bertscore"] == pytest.approx(1.0, abs=1e-5)


def test_bertscore_through_score_answers_and_cli(tiny_bert, tmp_path):
    items = [{"task": "report", "prediction": "the heart size is normal", "ground_truth": "the heart size is normal",
              "lang": "en"},
             {"task": "caption", "prediction": "lungs", "ground_truth": "the lungs are clear", "lang": "en"},
             {"task": "vqa", "prediction": "yes", "ground_truth": "yes"}]
    loaded = plugins.load_plugins({"bertscore": {"model_path": str(tiny_bert), "layer": None}})
    result = score_answers(items, loaded_plugins=loaded)
    mm = result["model_metrics"]
    assert set(mm["bertscore"]) == {"report", "caption"}
    assert mm["bertscore"]["report"]["f1"] == pytest.approx(1.0, abs=1e-5)
    assert mm["bertscore"]["report"]["n"] == 1
    assert mm["chexbert"] == mm["radgraph"] == NOT_COMPUTED

    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    out = tmp_path / "m.json"
    r = CliRunner().invoke(app, ["score", str(path), "--out", str(out), "--plugin", f"bertscore={tiny_bert}"])
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["model_metrics"]["bertscore"]["caption"]["n"] == 1


# -- loading contract: loud failures -------------------------------------------------------------

def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "no-such-model"
    for name in ("bertscore", "chexbert", "radgraph"):
        with pytest.raises(plugins.PluginError, match="no-such-model"):
            plugins.load_plugins({name: {"model_path": str(missing)}})


def test_missing_files_are_named(tmp_path, tiny_bert):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(plugins.PluginError) as err:
        plugins.BERTScore(empty)
    assert str(empty) in str(err.value)
    assert "config.json" in str(err.value) and "model.safetensors" in str(err.value) and "vocab.txt" in str(err.value)
    # a BERT directory is not a CheXbert one: the checkpoint is what is missing
    with pytest.raises(plugins.PluginError, match="chexbert.pth") as err:
        plugins.CheXbert(tiny_bert)
    assert "config.json" not in str(err.value)


def test_cli_plugin_errors_exit_3(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text(json.dumps({"task": "report", "prediction": "a", "ground_truth": "a"}) + "\n")
    runner = CliRunner()
    for flag in (f"bertscore={tmp_path / 'nowhere'}", "bleurt=/x", "bertscore"):
        r = runner.invoke(app, ["score", str(path), "--out", str(tmp_path / "m.json"), "--plugin", flag])
        assert r.exit_code == 3, (flag, r.output)
    assert not (tmp_path / "m.json").exists()


def test_not_requested_plugins_report_not_computed():
    assert plugins.load_plugins({"bertscore": {"model_path": None, "layer": None}, "chexbert": {"model_path": None},
                                 "radgraph": {"model_path": None}}) == {}
    result = score_answers([{"task": "report", "prediction": "normal", "ground_truth": "normal", "lang": "en"}])
    assert result["model_metrics"] == {"bertscore": NOT_COMPUTED, "chexbert": NOT_COMPUTED, "radgraph": NOT_COMPUTED}
    assert all(v.startswith("not computed") for v in result["model_metrics"].values())
    with pytest.raises(plugins.PluginError, match="unknown plug-in"):
        plugins.load_plugins({"bleurt": {"model_path": None}})


# -- CheXbert ------------------------------------------------------------------------------------

def test_label_f1_hand_computed():
    cond = ("A", "B")
    # A: tp 1, fp 1, fn 0 -> 2/3; B: tp 0, fp 0, fn 1 -> 0; micro: tp 1, fp 1, fn 1 -> 1/2
    pred = [[1, 2], [1, 0]]
    ref = [[1, 1], [2, 0]]
    r = plugins.label_f1(pred, ref, cond)
    assert r["per_observation_f1"] == {"A": pytest.approx(2 / 3), "B": 0.0}
    assert r["micro_f1"] == pytest.approx(0.5)
    assert r["macro_f1"] == pytest.approx(1 / 3)
    # uncertain (3) counts only when asked
    assert plugins.label_f1([[3]], [[1]], ("A",))["micro_f1"] == 0.0
    assert plugins.label_f1([[3]], [[1]], ("A",), uncertain_as_positive=True)["micro_f1"] == 1.0


def test_chexbert_loads_released_layout_and_scores(tiny_chexbert):
    cx = plugins.CheXbert(tiny_chexbert, batch_size=2)
    labels = cx.labels(["mild cardiomegaly", "the lungs are clear", ""])
    assert [len(x) for x in labels] == [14, 14, 14]
    assert all(x[1] == 1 and x[0] == 0 and x[13] == 0 for x in labels)
    r = cx.compute(["mild cardiomegaly", "lungs clear"], ["cardiomegaly", "no effusion"])
    assert r["per_observation_f1"]["Cardiomegaly"] == 1.0 and r["micro_f1"] == 1.0 and r["micro_f1_5"] == 1.0
    assert r["macro_f1"] == pytest.approx(1 / 14)


def test_chexbert_rejects_a_checkpoint_of_another_shape(tiny_chexbert, tmp_path):
    import shutil

    d = tmp_path / "bad"
    shutil.copytree(tiny_chexbert, d)
    torch.save({"model_state_dict": {"module.linear_heads.0.weight": torch.zeros(3, 3)}}, d / "chexbert.pth")
    with pytest.raises(plugins.PluginError, match="chexbert"):
        plugins.CheXbert(d)


def test_html_report_shows_plugin_figures(tiny_bert):
    from medrega.metrics import html

    items = [{"task": "report", "prediction": "heart normal", "ground_truth": "the heart size is normal", "lang": "en"}]
    result = score_answers(items, loaded_plugins=plugins.load_plugins({"bertscore": {"model_path": str(tiny_bert)}}))
    page = html.render(result, items, [])
    assert "<h3>bertscore</h3>" in page and "f1" in page and "chexbert: not computed (needs model weights" in page


def test_evaluate_stage_fails_loudly_on_a_bad_plugin_path(tmp_path):
    from tasks.evaluate import evaluate
    from tests.conftest import tiny

    cfg = tiny({"evaluate": {"plugins": {"chexbert": {"model_path": str(tmp_path / "cx")}}}})
    with pytest.raises(plugins.PluginError, match="cx"):  # before reading data or loading a model
        evaluate(tmp_path / "no-instructions", tmp_path / "no-model", tmp_path / "eval", cfg)
    assert not (tmp_path / "eval").exists()
