"""Metrics that need model weights (SPEC §6): BERTScore, CheXbert and RadGraph as opt-in plug-ins.

A plug-in runs only when it is given a local model directory, in params.yaml
(`evaluate.plugins.<name>.model_path`) or on the command line (`medrega score --plugin
bertscore=/models/roberta-large`). Nothing is ever downloaded: paths must be existing local
directories and every transformers call passes `local_files_only=True` (radgraph's own calls
run in the Hugging Face hub's offline mode). A plug-in that was asked for but cannot load (no
such folder, files missing, unreadable checkpoint) raises `PluginError` (a ValueError: the CLI
exits 3); it is never quietly "not computed". A plug-in nobody asked for is reported as
`NOT_REQUESTED`.

- bertscore: greedy cosine matching of contextual token embeddings (Zhang et al. 2020) with any
  local transformers encoder; precision, recall, F1; optional idf weighting (off by default,
  idf taken from the references, as bert-score does); no baseline rescaling. Special tokens
  ([CLS], [SEP], <s>, </s>) are left out of the matching. Run on CPU, in batches.
- chexbert: the released CheXbert checkpoint (`chexbert.pth`: a BERT encoder and 14 linear heads
  on the [CLS] state) plus the config and tokenizer of the BERT it was trained from
  (bert-base-uncased: `config.json`, `vocab.txt`). Each report gets 14 observation labels
  (blank / positive / negative / uncertain); an observation counts as present when positive
  (and, with `uncertain_as_positive`, when uncertain). F1 of the predicted reports' labels against
  the reference reports' labels: micro and macro over the 14 observations, and micro over the
  usual five (atelectasis, cardiomegaly, consolidation, edema, pleural effusion). English only.
- radgraph: RadGraph F1 (Delbrouck et al. 2022) with the `radgraph` package's own F1RadGraph and
  a released RadGraph model: the extracted archive (radgraph.tar.gz and siblings from
  StanfordAIMI/RRG_scorers: `config.json`, `vocabulary/`, `weights.th`) in a directory named
  after its model type (radgraph, radgraph-xl, echograph, modern-radgraph-xl), which picks the
  report pre-processing and the label namespaces. The BERT that config.json names must be a
  local directory or already in the local Hugging Face cache (loaded offline). Each report gets
  an entity/relation graph; per pair, F1 at radgraph's three reward levels: simple (entities:
  tokens and label), partial (entities and whether they have a relation), complete (entities
  with each relation and its target), averaged over pairs. An empty side, or a side with no
  entities, scores 0 (radgraph's rule: two reports without findings score 0, not 1). English
  only. radgraph targets transformers 4; `radgraph_compat` adds the tokenizer methods it calls.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

from medrega.errors import BadInput

PLUGINS = ("bertscore", "chexbert", "radgraph")
NOT_REQUESTED = "not computed (needs model weights: no local model path given)"

CHEXBERT_CONDITIONS = (
    "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices", "No Finding",
)
CHEXBERT_FIVE = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
CHEXBERT_CLASSES = ("blank", "positive", "negative", "uncertain")  # "No Finding": blank / positive

_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
_TOKENIZER = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")


class PluginError(BadInput):
    """A requested plug-in cannot run (bad path, missing files, bad options)."""


def _directory(name: str, model_path: str | Path | None) -> Path:
    if model_path in (None, ""):
        raise PluginError(f"{name}: no model_path given")
    path = Path(model_path).expanduser()
    if not path.is_dir():
        raise PluginError(f"{name}: model path {str(path)!r} is not a local directory "
                          "(plug-ins read local files only; nothing is downloaded)")
    return path


def _require(name: str, path: Path, need: Sequence[str | tuple[str, ...]]) -> None:
    """Each entry of `need` is a file name, or a tuple of alternatives of which one must exist."""
    missing = []
    for entry in need:
        options = (entry,) if isinstance(entry, str) else entry
        if not any((path / f).is_file() for f in options):
            missing.append(" or ".join(options))
    if missing:
        raise PluginError(f"{name}: model path {str(path)!r} lacks {'; '.join(missing)}")


def _max_length(tokenizer, model) -> int:
    limits = [512]
    if getattr(tokenizer, "model_max_length", None) and tokenizer.model_max_length < 1_000_000:
        limits.append(int(tokenizer.model_max_length))
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions:
        # RoBERTa-style models offset positions by padding_idx + 1
        offset = 2 if getattr(model.config, "model_type", "") in ("roberta", "xlm-roberta") else 0
        limits.append(int(positions) - offset)
    return max(8, min(limits))


class BERTScore:
    name = "bertscore"

    def __init__(self, model_path: str | Path, layer: int | None = None, idf: bool = False,
                 batch_size: int = 16, **unknown: Any):
        if unknown:
            raise PluginError(f"bertscore: unknown option(s) {', '.join(sorted(unknown))} "
                              "(known: model_path, layer, idf, batch_size)")
        path = _directory(self.name, model_path)
        _require(self.name, path, ["config.json", _WEIGHTS, _TOKENIZER])
        from transformers import AutoModel, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise PluginError(f"bertscore: cannot load the model in {str(path)!r}: {err}") from err
        n_layers = getattr(self.model.config, "num_hidden_layers", None)
        if layer is not None and (not isinstance(layer, int) or (n_layers is not None and not 0 <= layer <= n_layers)):
            raise PluginError(f"bertscore: layer {layer!r} out of range (0..{n_layers}; null: the last layer)")
        self.path, self.layer, self.idf, self.batch_size = path, layer, bool(idf), max(1, int(batch_size))
        self.max_length = _max_length(self.tokenizer, self.model)

    # -- embeddings -------------------------------------------------------------------------
    def _embed(self, texts: list[str]) -> list[tuple[Any, list[int]]]:
        """Per text: (unit-norm token embeddings [T, H] without special tokens, their token ids)."""
        import torch

        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = texts[start:start + self.batch_size]
            enc = self.tokenizer(batch, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt", return_special_tokens_mask=True)
            special = enc.pop("special_tokens_mask")
            with torch.no_grad():
                res = self.model(**enc, output_hidden_states=self.layer is not None)
            hidden = res.last_hidden_state if self.layer is None else res.hidden_states[self.layer]
            hidden = torch.nn.functional.normalize(hidden.float(), dim=-1)
            keep = enc["attention_mask"].bool() & ~special.bool()
            for i in range(len(batch)):
                out.append((hidden[i][keep[i]], enc["input_ids"][i][keep[i]].tolist()))
        return out

    def _idf(self, references: list[list[int]]) -> dict[int, float]:
        df = Counter(t for ids in references for t in set(ids))
        m = len(references)
        return {t: math.log((m + 1) / (n + 1)) for t, n in df.items()} | {-1: math.log(m + 1)}

    def score(self, predictions: Sequence[str], references: Sequence[str],
              idf_from: Sequence[str] | None = None) -> list[dict[str, float]]:
        """Per pair: {"precision", "recall", "f1"}; an empty side scores 0. `idf_from`: weight
        tokens by idf over these texts (bert-score's `idf_sents`; the authors' release passes
        the predictions) instead of the `idf` option's references."""
        import torch

        if len(predictions) != len(references):
            raise ValueError("bertscore: predictions and references differ in length")
        preds = [p if isinstance(p, str) else "" for p in predictions]
        refs = [r if isinstance(r, str) else "" for r in references]
        emb_p, emb_r = self._embed(preds), self._embed(refs)
        if idf_from is not None:
            docs = [t if isinstance(t, str) else "" for t in idf_from]
            idf = self._idf([ids for _, ids in (emb_p if docs == preds else self._embed(docs))])
        else:
            idf = self._idf([ids for _, ids in emb_r]) if self.idf else None

        def weights(ids: list[int]):
            if idf is None:
                return torch.ones(len(ids))
            return torch.tensor([idf.get(t, idf[-1]) for t in ids], dtype=torch.float)

        scores = []
        for (ep, ip), (er, ir) in zip(emb_p, emb_r):
            if not ip or not ir:
                scores.append({"precision": 0.0, "recall": 0.0, "f1": 0.0})
                continue
            sim = ep @ er.T
            wp, wr = weights(ip), weights(ir)
            p = float((sim.max(dim=1).values * wp).sum() / wp.sum()) if wp.sum() > 0 else 0.0
            r = float((sim.max(dim=0).values * wr).sum() / wr.sum()) if wr.sum() > 0 else 0.0
            f = 2 * p * r / (p + r) if p + r > 0 else 0.0
            scores.append({"precision": p, "recall": r, "f1": f})
        return scores

    def compute(self, predictions: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
        scores = self.score(predictions, references)
        n = len(scores)
        out: dict[str, Any] = {"n": n}
        for k in ("precision", "recall", "f1"):
            out[k] = sum(s[k] for s in scores) / n if n else 0.0
        out.update(layer="last" if self.layer is None else self.layer, idf=self.idf, rescaled=False)
        return out


def _f1(tp: int, fp: int, fn: int) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def label_f1(predicted: Sequence[Sequence[int]], reference: Sequence[Sequence[int]],
             conditions: Sequence[str] = CHEXBERT_CONDITIONS, uncertain_as_positive: bool = False) -> dict[str, Any]:
    """F1 between two reports' CheXbert labels (class ids per observation, in `conditions`
    order). Positive class 1 (and 3 with `uncertain_as_positive`). Micro: over every
    (report, observation); macro: the mean over observations of each one's F1, an observation
    positive in neither side scoring 0 (as scikit-learn's zero_division=0)."""
    pos = {1, 3} if uncertain_as_positive else {1}
    counts = {c: [0, 0, 0] for c in conditions}  # tp, fp, fn
    for pred, ref in zip(predicted, reference):
        for c, a, b in zip(conditions, pred, ref):
            pa, pb = a in pos, b in pos
            counts[c][0] += pa and pb
            counts[c][1] += pa and not pb
            counts[c][2] += pb and not pa

    def micro(names):
        return _f1(*(sum(counts[c][i] for c in names) for i in range(3)))

    per = {c: _f1(*counts[c]) for c in conditions}
    five = [c for c in CHEXBERT_FIVE if c in counts]
    return {"n": len(predicted), "micro_f1": micro(conditions), "macro_f1": sum(per.values()) / len(per),
            "micro_f1_5": micro(five) if five else 0.0, "per_observation_f1": per}


class CheXbert:
    name = "chexbert"
    checkpoint = "chexbert.pth"

    def __init__(self, model_path: str | Path, uncertain_as_positive: bool = False, batch_size: int = 16,
                 **unknown: Any):
        if unknown:
            raise PluginError(f"chexbert: unknown option(s) {', '.join(sorted(unknown))} "
                              "(known: model_path, uncertain_as_positive, batch_size)")
        path = _directory(self.name, model_path)
        _require(self.name, path, [self.checkpoint, "config.json", ("vocab.txt", "tokenizer.json")])
        import torch
        from transformers import AutoTokenizer, BertConfig, BertModel

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            config = BertConfig.from_pretrained(str(path), local_files_only=True)
            state = torch.load(path / self.checkpoint, map_location="cpu", weights_only=True)
        except (OSError, ValueError, KeyError, RuntimeError, EOFError) as err:
            raise PluginError(f"chexbert: cannot read {str(path)!r}: {err}") from err
        state = state.get("model_state_dict", state) if isinstance(state, dict) else state
        state = {k.removeprefix("module."): v for k, v in state.items()}
        bert = {k[len("bert."):]: v for k, v in state.items() if k.startswith("bert.")}
        heads = torch.nn.ModuleList([torch.nn.Linear(config.hidden_size, 4) for _ in range(13)]
                                    + [torch.nn.Linear(config.hidden_size, 2)])
        head_state = {k[len("linear_heads."):]: v for k, v in state.items() if k.startswith("linear_heads.")}
        self.model = BertModel(config, add_pooling_layer=any(k.startswith("pooler.") for k in bert)).eval()
        try:
            missing, unexpected = self.model.load_state_dict(bert, strict=False)
            heads.load_state_dict(head_state)
        except RuntimeError as err:
            raise PluginError(f"chexbert: {self.checkpoint} in {str(path)!r} does not fit the CheXbert "
                              f"architecture (BERT + 13 four-class heads + one two-class head): {err}") from err
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise PluginError(f"chexbert: {self.checkpoint} in {str(path)!r} does not match config.json: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.heads = heads.eval()
        self.path, self.uncertain_as_positive = path, bool(uncertain_as_positive)
        self.batch_size = max(1, int(batch_size))
        self.max_length = _max_length(self.tokenizer, self.model)

    def labels(self, texts: Sequence[str]) -> list[list[int]]:
        """14 class ids per text (see CHEXBERT_CLASSES)."""
        import torch

        out: list[list[int]] = []
        texts = [" ".join((t if isinstance(t, str) else "").split()) for t in texts]
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            with torch.no_grad():
                hidden = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
                cls = hidden.last_hidden_state[:, 0]
                preds = torch.stack([h(cls).argmax(dim=-1) for h in self.heads], dim=1)
            out.extend(preds.tolist())
        return out

    def compute(self, predictions: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
        result = label_f1(self.labels(predictions), self.labels(references),
                          uncertain_as_positive=self.uncertain_as_positive)
        result["uncertain_as_positive"] = self.uncertain_as_positive
        return result


def _nested(config: Any, keys: str) -> Any:
    for key in keys.split("."):
        if not isinstance(config, dict) or key not in config:
            return None
        config = config[key]
    return config


def _local_transformer(name: Any, where: str) -> None:
    """`name` (a model_name in a RadGraph config.json) must load without the network: a local
    directory, or a hub id already in the local Hugging Face cache."""
    from huggingface_hub import constants, try_to_load_from_cache

    if not isinstance(name, str) or not name:
        raise PluginError(f"radgraph: {where} is missing or not a string")
    if Path(name).is_dir():
        return
    try:
        cached = try_to_load_from_cache(name, "config.json")
    except ValueError:  # not a valid hub id (e.g. a path that does not exist)
        cached = None
    if not isinstance(cached, str):
        raise PluginError(f"radgraph: {where} names the BERT {name!r}, which is neither a local directory nor in "
                          f"the local Hugging Face cache ({constants.HF_HUB_CACHE}); nothing is downloaded. "
                          f"Put a copy of that model (its config.json and tokenizer files) in a local directory "
                          f"and set both model_name fields of the config.json to that path, or fill the cache "
                          f"(HF_HOME) where the hub is reachable")


class RadGraph:
    name = "radgraph"
    model_types = ("radgraph", "radgraph-xl", "echograph", "modern-radgraph-xl")
    levels = ("simple", "partial", "complete")

    def __init__(self, model_path: str | Path, **unknown: Any):
        if unknown:
            raise PluginError(f"radgraph: unknown option(s) {', '.join(sorted(unknown))} (known: model_path)")
        path = _directory(self.name, model_path)
        model_type = path.name
        if model_type not in self.model_types:
            raise PluginError(f"radgraph: model path {str(path)!r} must be the extracted archive in a directory "
                              f"named after its model type ({', '.join(self.model_types)}): radgraph reads "
                              f"<parent>/<model type>, and the type picks the report pre-processing; rename "
                              f"the folder or link it under that name")
        labels = [f"vocabulary/{model_type}__{kind}_labels.txt" for kind in ("ner", "relation")]
        _require(self.name, path, ["config.json", "weights.th", "vocabulary/non_padded_namespaces.txt", *labels])
        if not os.access(path / "vocabulary", os.W_OK):  # allennlp's Vocabulary.from_files locks it
            raise PluginError(f"radgraph: {str(path / 'vocabulary')!r} is not writable (radgraph writes a .lock "
                              "file there while it reads the labels)")
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as err:
            raise PluginError(f"radgraph: cannot read {str(path / 'config.json')!r}: {err}") from err
        for keys in ("dataset_reader.token_indexers.bert.model_name", "model.embedder.token_embedders.bert.model_name"):
            _local_transformer(_nested(config, keys), f"{keys} in {str(path / 'config.json')!r}")

        from medrega.metrics import radgraph_compat

        try:
            radgraph_compat.install()
            from radgraph import F1RadGraph

            with radgraph_compat.hub_offline(), contextlib.redirect_stdout(sys.stderr):
                self.model = F1RadGraph(reward_level="all", model_type=model_type,
                                        model_cache_dir=str(path.parent), cuda=-1)
        except Exception as err:  # radgraph/allennlp raise assertions, KeyErrors, their own errors
            detail = str(err) if len(str(err)) <= 600 else str(err)[:600] + " ..."  # a state_dict error lists every key
            raise PluginError(f"radgraph: cannot load the RadGraph model in {str(path)!r}: "
                              f"{type(err).__name__}: {detail}") from err
        self.model.eval()
        self.path, self.model_type = path, model_type

    def score(self, predictions: Sequence[str], references: Sequence[str]) -> list[dict[str, float]]:
        """Per pair: {"simple_f1", "partial_f1", "complete_f1"}; an empty side scores 0."""
        import torch

        if len(predictions) != len(references):
            raise ValueError("radgraph: predictions and references differ in length")
        # whitespace collapsed: radgraph fails on a whitespace-only report and splits on spaces anyway
        preds = [" ".join(p.split()) if isinstance(p, str) else "" for p in predictions]
        refs = [" ".join(r.split()) if isinstance(r, str) else "" for r in references]
        if not preds:
            return []
        with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
            _, rewards, _, _ = self.model(refs=refs, hyps=preds)
        return [{f"{level}_f1": float(v) for level, v in zip(self.levels, triple)} for triple in zip(*rewards)]

    def compute(self, predictions: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
        scores = self.score(predictions, references)
        n = len(scores)
        out: dict[str, Any] = {"n": n}
        for level in self.levels:
            out[f"{level}_f1"] = sum(s[f"{level}_f1"] for s in scores) / n if n else 0.0
        out["model_type"] = self.model_type
        return out


_CLASSES = {"bertscore": BERTScore, "chexbert": CheXbert, "radgraph": RadGraph}
# Which tasks' texts each plug-in scores, and in which languages (None: all).
PLUGIN_TASKS = {"bertscore": ("r2t", "grounded", "report", "caption"), "chexbert": ("grounded", "report"),
                "radgraph": ("grounded", "report")}
PLUGIN_LANGS = {"bertscore": None, "chexbert": ("en",), "radgraph": ("en",)}


def parse_plugin_args(values: Iterable[str]) -> dict[str, dict[str, Any]]:
    """`["bertscore=/models/x", ...]` -> `{"bertscore": {"model_path": "/models/x"}}`."""
    out: dict[str, dict[str, Any]] = {}
    for value in values or ():
        name, sep, path = value.partition("=")
        name = name.strip().lower()
        if not sep or not path.strip():
            raise PluginError(f"--plugin {value!r}: expected NAME=LOCAL_MODEL_DIR ({', '.join(PLUGINS)})")
        if name not in PLUGINS:
            raise PluginError(f"--plugin {value!r}: unknown plug-in {name!r} (known: {', '.join(PLUGINS)})")
        out[name] = {"model_path": path.strip()}
    return out


def load_plugins(config, overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Load every plug-in that has a model_path (params `evaluate.plugins`, then `overrides`
    from the command line). Raises PluginError for the first one that cannot load."""
    if hasattr(config, "model_dump"):
        config = {n: {k: v for k, v in opts.items() if v is not None}
                  for n, opts in config.model_dump(mode="json").items()}
    config = dict(config or {})
    for name in config:
        if name not in PLUGINS:
            raise PluginError(f"evaluate.plugins: unknown plug-in {name!r} (known: {', '.join(PLUGINS)})")
    merged = {n: {**(config.get(n) or {}), **((overrides or {}).get(n) or {})} for n in PLUGINS}
    return {n: _CLASSES[n](**opts) for n, opts in merged.items() if opts.get("model_path") not in (None, "")}


def compute(loaded: dict[str, Any], texts: dict[tuple[str, str], tuple[list[str], list[str]]]) -> dict[str, Any]:
    """`model_metrics` for the result: per plug-in, its figures per task (over the languages it
    supports), or why it was not computed. `texts`: {(task, lang): (predictions, references)}."""
    out: dict[str, Any] = {}
    for name in PLUGINS:
        if name not in loaded:
            out[name] = NOT_REQUESTED
            continue
        langs, per_task = PLUGIN_LANGS[name], {}
        for task in PLUGIN_TASKS[name]:
            preds: list[str] = []
            refs: list[str] = []
            for (t, lang), (p, r) in texts.items():
                if t == task and (langs is None or lang in langs):
                    preds += p
                    refs += r
            if preds:
                per_task[task] = loaded[name].compute(preds, refs)
        out[name] = per_task or (f"not computed (no {'/'.join(PLUGIN_TASKS[name])} answers"
                                 + (f" in {'/'.join(langs)}" if langs else "") + ")")
    return out
