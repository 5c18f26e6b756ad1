"""RadGraph F1 plug-in: the `radgraph` package (written for transformers 4) run under
transformers 5 through `medrega.metrics.radgraph_compat`, on a tiny archive built here in the
released layout (config.json, vocabulary/, weights.th) with random weights and a tiny local
BERT. Nothing touches the network: sockets are refused and the Hugging Face cache is empty."""
import json
import math
import re
import shutil
import socket

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("radgraph")

from typer.testing import CliRunner  # noqa: E402

from cli import app  # noqa: E402
from medrega.metrics import plugins, radgraph_compat  # noqa: E402
from medrega.metrics.scoring import NOT_COMPUTED, score_answers  # noqa: E402
from medrega.grammar import format_regions  # noqa: E402

WORDS = ("no acute cardiopulmonary process the heart size is normal mild cardiomegaly small left pleural "
         "effusion lungs are clear right lower lobe opacity with and of").split()
NER = ("ANAT-DP", "OBS-DP", "OBS-U", "OBS-DA")
RELATIONS = ("suggestive_of", "located_at", "modify")
LEVELS = ("simple_f1", "partial_f1", "complete_f1")
HUB_BERT = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract-fulltext"


def _offline(mp, hf_home):
    """Refuse every internet socket and point the Hugging Face cache at an empty folder."""
    import huggingface_hub.constants as hub

    def refuse(sock, address, *args):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError(f"test: network access to {address!r} refused")
        return real_connect(sock, address, *args)

    real_connect = socket.socket.connect
    mp.setattr(socket.socket, "connect", refuse)
    hf_home.mkdir(parents=True, exist_ok=True)
    mp.setenv("HF_HOME", str(hf_home))
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setattr(hub, "HF_HUB_CACHE", str(hf_home / "hub"))


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    _offline(monkeypatch, tmp_path / "hf-home")
    yield
    assert not any((tmp_path / "hf-home").iterdir()), "something was written to the Hugging Face cache"


def _config(bert: str, max_span_width: int = 4) -> dict:
    """The released RadGraph config.json's structure (dygie reader and model), tiny sizes."""
    indexer = {"type": "pretrained_transformer_mismatched", "model_name": bert, "max_length": 32}
    return {
        "dataset_reader": {"type": "dygie", "max_span_width": max_span_width, "token_indexers": {"bert": indexer}},
        "model": {
            "type": "dygie",
            "embedder": {"token_embedders": {"bert": dict(indexer)}},
            "feature_size": 8,
            "max_span_width": max_span_width,
            "target_task": "relation",
            "loss_weights": {"ner": 1.0, "relation": 1.0, "coref": 0.0, "events": 0.0},
            "feedforward_params": {"num_layers": 2, "hidden_dims": 12, "dropout": 0.4},
            "modules": {"coref": {"spans_per_word": 0.3, "max_antecedents": 100, "coref_prop": 0},
                        "ner": {}, "relation": {"spans_per_word": 0.5},
                        "events": {"trigger_spans_per_word": 0.3, "argument_spans_per_word": 0.8,
                                   "loss_weights": {"trigger": 1.0, "arguments": 1.0}}},
            "initializer": {"regexes": [["_span_width_embedding.weight", {"type": "xavier_normal"}]]},
            "module_initializer": {"regexes": [[".*weight", {"type": "xavier_normal"}],
                                               [".*weight_matrix", {"type": "xavier_normal"}]]},
        },
    }


def _weights(archive, config: dict) -> None:
    """weights.th: the state dict of the DyGIE model built the way radgraph's RadGraph builds it.
    The NER head says OBS-DP for every span and the relation head says `modify` for every kept
    pair, so every report has entities and relations and the figures below are exact."""
    from radgraph.allennlp.data import Vocabulary
    from radgraph.allennlp.modules import text_field_embedders, token_embedders
    from radgraph.dygie.models import dygie

    radgraph_compat.install()
    vocab = Vocabulary.from_files(str(archive / "vocabulary"))
    bert = config["model"]["embedder"]["token_embedders"]["bert"]
    token_embedder = token_embedders.PretrainedTransformerMismatchedEmbedder(model_name=bert["model_name"],
                                                                             max_length=bert["max_length"])
    embedder = text_field_embedders.BasicTextFieldEmbedder({"bert": token_embedder})
    dropped = ("type", "embedder", "initializer", "module_initializer")  # as RadGraph.__init__ drops them
    kwargs = {k: v for k, v in config["model"].items() if k not in dropped}
    torch.manual_seed(0)
    state = dygie.DyGIE(vocab=vocab, embedder=embedder, **kwargs).state_dict()
    ner = "_ner._ner_scorers.radgraph__ner_labels.1._module"
    state[f"{ner}.weight"].zero_()
    state[f"{ner}.bias"].copy_(torch.tensor([0.0, 50.0, 0.0, 0.0]))  # scores for NER[0..3]; null scores 0
    rel = "_relation._relation_scorers.radgraph__relation_labels"
    state[f"{rel}.weight"].zero_()
    state[f"{rel}.bias"].copy_(torch.tensor([0.0, 0.0, 50.0]))  # RELATIONS[2], modify; null scores 0
    (archive / "vocabulary" / ".lock").unlink(missing_ok=True)
    torch.save(state, archive / "weights.th")


@pytest.fixture(scope="module")
def tiny_radgraph(tmp_path_factory):
    """<tmp>/models/radgraph: config.json, vocabulary/, weights.th, as radgraph.tar.gz extracts;
    its config names <tmp>/bert (config.json + vocab.txt, no weights: radgraph builds the BERT
    from its config and loads every weight from weights.th)."""
    from transformers import BertConfig

    root = tmp_path_factory.mktemp("radgraph")
    with pytest.MonkeyPatch.context() as mp:
        _offline(mp, root / "hf-home")
        bert = root / "bert"
        bert.mkdir()
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "a", "b", *sorted(set(WORDS))]
        (bert / "vocab.txt").write_text("\n".join(vocab) + "\n")
        BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                   intermediate_size=32, max_position_embeddings=64).save_pretrained(bert)
        archive = root / "models" / "radgraph"
        (archive / "vocabulary").mkdir(parents=True)
        (archive / "vocabulary" / "non_padded_namespaces.txt").write_text("*tags\n*labels\n")
        # label namespaces are keyed by model type; index 0 of the NER labels is the null label ""
        (archive / "vocabulary" / "radgraph__ner_labels.txt").write_text("\n" + "\n".join(NER) + "\n")
        (archive / "vocabulary" / "radgraph__relation_labels.txt").write_text("\n".join(RELATIONS) + "\n")
        config = _config(str(bert))
        (archive / "config.json").write_text(json.dumps(config, indent=2))
        _weights(archive, config)
    return archive


@pytest.fixture(scope="module")
def loaded(tiny_radgraph):
    with pytest.MonkeyPatch.context() as mp:
        _offline(mp, tiny_radgraph.parent.parent / "hf-home")
        return plugins.RadGraph(tiny_radgraph)


def _variant(tiny_radgraph, tmp_path, name="radgraph", **model_names):
    """A copy of the tiny archive in <tmp_path>/<name>, optionally naming other BERTs."""
    d = tmp_path / "variant" / name
    shutil.copytree(tiny_radgraph, d)
    if model_names:
        config = json.loads((d / "config.json").read_text())
        config["dataset_reader"]["token_indexers"]["bert"]["model_name"] = model_names["reader"]
        config["model"]["embedder"]["token_embedders"]["bert"]["model_name"] = model_names["embedder"]
        (d / "config.json").write_text(json.dumps(config))
    return d


# -- the transformers-5 shims ---------------------------------------------------------------------

def test_compat_gives_radgraph_tokenizers_transformers4_methods(tiny_radgraph):
    from radgraph.allennlp.common import cached_transformers
    from transformers import AutoTokenizer

    bert = str(tiny_radgraph.parent.parent / "bert")
    plain = AutoTokenizer.from_pretrained(bert, local_files_only=True)
    assert not hasattr(plain, "encode_plus") and not hasattr(plain, "build_inputs_with_special_tokens")
    radgraph_compat.install()
    radgraph_compat.install()  # idempotent: wrapped once
    assert getattr(cached_transformers.get_tokenizer, "__wrapped__") is not None
    assert not hasattr(cached_transformers.get_tokenizer.__wrapped__, "__wrapped__")
    tok = cached_transformers.get_tokenizer(bert, use_fast=True)
    kw = dict(add_special_tokens=True, return_token_type_ids=True, return_attention_mask=False)
    assert dict(tok.encode_plus("heart", "lungs", **kw)) == dict(plain("heart", "lungs", **kw))
    single = tok.encode_plus(text="the heart", add_special_tokens=False, max_length=32, stride=0,
                             truncation="longest_first", return_tensors=None, return_offsets_mapping=True,
                             return_attention_mask=False, return_token_type_ids=True)
    assert single["input_ids"] == plain.convert_tokens_to_ids(["the", "heart"])
    assert single["offset_mapping"] == [(0, 3), (4, 9)]
    cls, sep = tok.cls_token_id, tok.sep_token_id
    assert tok.build_inputs_with_special_tokens([7, 8]) == [cls, 7, 8, sep]
    assert tok.build_inputs_with_special_tokens([7], [8, 9]) == [cls, 7, sep, 8, 9, sep]
    # only what is missing is added, and only to the instance
    assert "encode_plus" not in type(tok).__dict__ and not hasattr(plain, "encode_plus")

    class Old:
        def encode_plus(self, *a, **k):
            return "own"

    old = radgraph_compat.patch_tokenizer(Old())
    assert old.encode_plus("x") == "own"


def test_hub_offline_is_restored():
    import huggingface_hub
    import huggingface_hub.constants as hub

    before = hub.HF_HUB_OFFLINE
    with radgraph_compat.hub_offline():
        assert huggingface_hub.is_offline_mode()
    assert hub.HF_HUB_OFFLINE == before


# -- scoring ---------------------------------------------------------------------------------------

def test_identical_reports_score_one_at_every_level(loaded):
    texts = ["no acute cardiopulmonary process", "mild cardiomegaly with small left pleural effusion.",
             "the heart size is normal , lungs are clear"]
    graphs = loaded.model.radgraph(texts)
    assert all(g["entities"] for g in graphs.values())  # the levels below are not the empty case
    assert any(e["relations"] for g in graphs.values() for e in g["entities"].values())
    for s in loaded.score(texts, texts):
        assert s == {"simple_f1": 1.0, "partial_f1": 1.0, "complete_f1": 1.0}


def test_figures_are_f1_in_range_and_hand_checked(loaded):
    # every span of up to 4 words is an OBS-DP entity: the reference "the heart" has 3 (the, heart,
    # the heart), the prediction "the heart size is normal" 5 + 4 + 3 + 2 = 14, 3 of them shared:
    # simple F1 = 2 * (3/14 * 1) / (3/14 + 1) = 6/17
    s = loaded.score(["the heart size is normal"], ["the heart"])[0]
    assert s["simple_f1"] == pytest.approx(6 / 17)
    for level in LEVELS:
        assert math.isfinite(s[level]) and 0.0 <= s[level] <= 1.0
    # an empty (or blank) side scores 0, as radgraph's F1RadGraph does; texts are not mixed up
    preds = ["", "   \n ", "lungs are clear", "the heart"]
    refs = ["the heart", "lungs are clear", "", "the heart"]
    assert [x["simple_f1"] for x in loaded.score(preds, refs)] == [0.0, 0.0, 0.0, 1.0]
    r = loaded.compute(preds, refs)
    assert r == {"n": 4, "simple_f1": 0.25, "partial_f1": 0.25, "complete_f1": 0.25, "model_type": "radgraph"}
    with pytest.raises(ValueError, match="length"):
        loaded.score(["a"], [])
    assert loaded.score([], []) == [] and loaded.compute([], [])["n"] == 0


def test_long_reports_are_folded_into_bert_length_segments(loaded):
    # 12 * 8 words > max_length 32 wordpieces: the indexer splits the wordpieces into segments and
    # wraps each in [CLS] ... [SEP] (build_inputs_with_special_tokens, shimmed)
    long = " ".join(["the heart size is normal , lungs are clear"] * 12)
    assert loaded.score([long], [long])[0] == {"simple_f1": 1.0, "partial_f1": 1.0, "complete_f1": 1.0}
    short = loaded.score(["the heart size is normal , lungs are clear"], [long])[0]
    assert 0.0 < short["simple_f1"] < 1.0


def test_through_score_answers_evaluate_and_cli(tiny_radgraph, tmp_path):
    grounded = format_regions([("heart", [[10, 10, 200, 200]])]) + ": the heart size is normal"
    items = [{"task": "report", "prediction": "no acute cardiopulmonary process",
              "ground_truth": "no acute cardiopulmonary process", "lang": "en"},
             {"task": "report", "prediction": "the heart size is normal", "ground_truth": "the heart", "lang": "en"},
             {"task": "report", "prediction": "心脏大小正常", "ground_truth": "心脏大小正常", "lang": "zh"},
             {"task": "grounded", "prediction": grounded, "ground_truth": grounded, "width": 512, "height": 512,
              "lang": "en"},
             {"task": "caption", "prediction": "lungs", "ground_truth": "lungs are clear", "lang": "en"}]
    loaded = plugins.load_plugins({"radgraph": {"model_path": str(tiny_radgraph)}})
    result = score_answers(items, loaded_plugins=loaded)
    mm = result["model_metrics"]
    assert set(mm["radgraph"]) == {"report", "grounded"}  # English reports only; captions are not scored
    rep = mm["radgraph"]["report"]
    assert rep["n"] == 2 and rep["model_type"] == "radgraph"
    assert rep["simple_f1"] == pytest.approx((1 + 6 / 17) / 2)
    assert mm["radgraph"]["grounded"] == {"n": 1, "simple_f1": 1.0, "partial_f1": 1.0, "complete_f1": 1.0,
                                          "model_type": "radgraph"}
    assert mm["bertscore"] == mm["chexbert"] == NOT_COMPUTED
    from medrega.metrics import html

    page = html.render(result, items, [])
    assert "<h3>radgraph</h3>" in page and "complete_f1" in page

    from medrega.config import EvaluateConfig

    # the evaluate stage's route: params' `evaluate.plugins` section -> loaded plug-ins -> figures
    from_params = plugins.load_plugins(EvaluateConfig(plugins={"radgraph": {"model_path": str(tiny_radgraph)}}).plugins)
    assert score_answers(items[:1], loaded_plugins=from_params)["model_metrics"]["radgraph"]["report"]["complete_f1"] == 1.0

    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    out = tmp_path / "m.json"
    r = CliRunner().invoke(app, ["score", str(path), "--out", str(out), "--plugin", f"radgraph={tiny_radgraph}"])
    assert r.exit_code == 0, r.output
    assert "Using device" not in r.stdout  # radgraph's prints go to stderr, not into the JSON
    written = json.loads(out.read_text())["model_metrics"]["radgraph"]["report"]
    assert written["simple_f1"] == pytest.approx(rep["simple_f1"])


# -- loading contract: loud failures ---------------------------------------------------------------

def test_wrong_directory_name_is_refused(tiny_radgraph, tmp_path):
    d = _variant(tiny_radgraph, tmp_path, name="my-radgraph")
    with pytest.raises(plugins.PluginError, match=re.escape(str(d))) as err:
        plugins.load_plugins({"radgraph": {"model_path": str(d)}})
    assert "radgraph-xl" in str(err.value) and "model type" in str(err.value)


def test_missing_archive_files_are_named(tiny_radgraph, tmp_path):
    d = _variant(tiny_radgraph, tmp_path)
    (d / "weights.th").unlink()
    (d / "vocabulary" / "radgraph__ner_labels.txt").unlink()
    with pytest.raises(plugins.PluginError, match=re.escape(str(d))) as err:
        plugins.RadGraph(d)
    assert "weights.th" in str(err.value) and "radgraph__ner_labels.txt" in str(err.value)
    # a radgraph-xl directory holding a radgraph archive: its labels are keyed "radgraph__"
    xl = _variant(tiny_radgraph, tmp_path / "xl", name="radgraph-xl")
    with pytest.raises(plugins.PluginError, match="radgraph-xl__ner_labels.txt"):
        plugins.RadGraph(xl)
    with pytest.raises(plugins.PluginError, match="unknown option"):
        plugins.RadGraph(tiny_radgraph, reward_level="simple")


def test_a_bert_that_is_not_local_is_refused_without_downloading(tiny_radgraph, tmp_path):
    d = _variant(tiny_radgraph, tmp_path, reader=HUB_BERT, embedder=HUB_BERT)
    with pytest.raises(plugins.PluginError) as err:
        plugins.load_plugins({"radgraph": {"model_path": str(d)}})
    msg = str(err.value)
    assert str(d) in msg and HUB_BERT in msg and "local directory" in msg and "nothing is downloaded" in msg
    missing = tmp_path / "no-such-bert"
    local = str(tiny_radgraph.parent.parent / "bert")
    d2 = _variant(tiny_radgraph, tmp_path / "2", reader=local, embedder=str(missing))
    with pytest.raises(plugins.PluginError, match=re.escape(str(missing))):
        plugins.RadGraph(d2)


def test_a_bert_in_the_local_hub_cache_loads_offline(tiny_radgraph, tmp_path, monkeypatch):
    """The released configs name hub ids; one already in the Hugging Face cache loads with the
    hub offline (the cache layout: models--org--name/{refs/main, snapshots/<commit>/...})."""
    import huggingface_hub.constants as hub

    cache = tmp_path / "filled-cache"
    repo = cache / "models--medrega-test--tiny-radgraph-bert"
    commit = "0" * 40
    shutil.copytree(tiny_radgraph.parent.parent / "bert", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    name = "medrega-test/tiny-radgraph-bert"
    d = _variant(tiny_radgraph, tmp_path, reader=name, embedder=name)
    rg = plugins.RadGraph(d)
    assert rg.score(["the heart size is normal"], ["the heart"])[0]["simple_f1"] == pytest.approx(6 / 17)


def test_an_archive_of_another_shape_is_a_plugin_error(tiny_radgraph, tmp_path):
    d = _variant(tiny_radgraph, tmp_path)
    torch.save({"_ner.x": torch.zeros(1)}, d / "weights.th")
    with pytest.raises(plugins.PluginError, match=re.escape(str(d))) as err:
        plugins.RadGraph(d)
    assert "state_dict" in str(err.value) and len(str(err.value)) < 800


def test_cli_exits_3_on_a_bad_radgraph_dir(tiny_radgraph, tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text(json.dumps({"task": "report", "prediction": "a", "ground_truth": "a", "lang": "en"}) + "\n")
    bad = _variant(tiny_radgraph, tmp_path, name="rg")
    r = CliRunner().invoke(app, ["score", str(path), "--out", str(tmp_path / "m.json"), "--plugin", f"radgraph={bad}"])
    assert r.exit_code == 3, r.output
    assert not (tmp_path / "m.json").exists()
