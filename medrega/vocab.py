"""One vocabulary table for every structure and lesion name the pipeline emits or scores.

Each entry gives the canonical English name, the Chinese name, accepted synonyms, the
modalities it appears in, and whether it is a lesion. Builders take names from here (so the
two languages always agree), validation checks labels against it, and the evaluator maps
free-text answers back to a canonical key with `canonical()`.
"""
from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Structure:
    key: str
    en: str
    zh: str
    modalities: tuple[str, ...]
    lesion: bool = False
    synonyms: tuple[str, ...] = field(default_factory=tuple)

    def name(self, lang: str) -> str:
        return self.zh if lang == "zh" else self.en


# The eight imaging modalities of SPEC §4, with their display names in both languages.
MODALITIES: dict[str, dict[str, str]] = {
    "ct": {"en": "CT", "zh": "CT"},
    "mr": {"en": "MRI", "zh": "磁共振"},
    "xray": {"en": "X-ray", "zh": "X线"},
    "us": {"en": "ultrasound", "zh": "超声"},
    "pathology": {"en": "pathology", "zh": "病理"},
    "dermoscopy": {"en": "dermoscopy", "zh": "皮肤镜"},
    "fundus": {"en": "fundus photograph", "zh": "眼底照相"},
    "oct": {"en": "OCT", "zh": "光学相干断层扫描"},
}

STRUCTURES: tuple[Structure, ...] = (
    Structure("liver", "liver", "肝脏", ("ct", "mr", "us"), synonyms=("hepar", "肝")),
    Structure("spleen", "spleen", "脾脏", ("ct", "mr"), synonyms=("脾",)),
    Structure("right_kidney", "right kidney", "右肾", ("ct", "mr", "us"), synonyms=("kidney right", "r kidney")),
    Structure("left_kidney", "left kidney", "左肾", ("ct", "mr", "us"), synonyms=("kidney left", "l kidney")),
    Structure("stomach", "stomach", "胃", ("ct", "mr")),
    Structure("pancreas", "pancreas", "胰腺", ("ct", "mr"), synonyms=("胰",)),
    Structure("aorta", "aorta", "主动脉", ("ct", "mr")),
    Structure("gallbladder", "gallbladder", "胆囊", ("ct", "mr", "us"), synonyms=("gall bladder",)),
    Structure("bladder", "urinary bladder", "膀胱", ("ct", "mr", "us"), synonyms=("bladder",)),
    Structure("right_lung", "right lung", "右肺", ("ct", "xray"), synonyms=("lung right",)),
    Structure("left_lung", "left lung", "左肺", ("ct", "xray"), synonyms=("lung left",)),
    Structure("heart", "heart", "心脏", ("ct", "mr", "xray"), synonyms=("cardiac silhouette", "心")),
    Structure("left_ventricle", "left ventricle", "左心室", ("mr", "us"), synonyms=("lv",)),
    Structure("right_ventricle", "right ventricle", "右心室", ("mr", "us"), synonyms=("rv",)),
    Structure("myocardium", "heart myocardium", "心肌", ("mr",), synonyms=("myocardium", "left ventricular myocardium")),
    Structure("brain", "brain", "脑", ("ct", "mr"), synonyms=("大脑",)),
    Structure("optic_disc", "optic disc", "视盘", ("fundus",), synonyms=("optic disk", "视神经盘")),
    Structure("macula", "macula", "黄斑", ("fundus",)),
    Structure("retina", "retinal layer", "视网膜层", ("oct",), synonyms=("retina",)),
    Structure("nucleus", "cell nucleus", "细胞核", ("pathology",), synonyms=("nucleus", "nuclei")),
    Structure("gland", "gland", "腺体", ("pathology",)),
    # Lesions.
    Structure("liver_tumor", "liver tumor", "肝脏肿瘤", ("ct", "mr"), lesion=True, synonyms=("liver tumour", "hepatic tumor", "肝肿瘤")),
    Structure("kidney_tumor", "kidney tumor", "肾脏肿瘤", ("ct",), lesion=True, synonyms=("kidney tumour", "renal tumor", "肾肿瘤")),
    Structure("pancreatic_cancer", "pancreatic cancer", "胰腺癌", ("ct",), lesion=True, synonyms=("pancreas tumor", "pancreatic tumor")),
    Structure("lung_nodule", "lung nodule", "肺结节", ("ct", "xray"), lesion=True, synonyms=("pulmonary nodule",)),
    Structure("brain_tumor", "brain tumor", "脑肿瘤", ("mr",), lesion=True, synonyms=("brain tumour", "glioma", "脑瘤")),
    Structure("skin_lesion", "skin lesion", "皮肤病变", ("dermoscopy",), lesion=True, synonyms=("lesion", "melanocytic lesion")),
    Structure("fluid", "intraretinal fluid", "视网膜内积液", ("oct",), lesion=True, synonyms=("fluid",)),
    Structure("hemorrhage", "retinal hemorrhage", "视网膜出血", ("fundus",), lesion=True, synonyms=("hemorrhage", "haemorrhage")),
)

BY_KEY: dict[str, Structure] = {s.key: s for s in STRUCTURES}

_PUNCT = re.compile(r"[\s\-_.,;:!?'\"()\[\]{}，。；：！？、（）]+")


@functools.lru_cache(maxsize=1 << 16)  # scoring asks for the same few hundred names over and over
def normalize(text: str) -> str:
    """Case-, width-, space- and punctuation-insensitive form of a name."""
    text = unicodedata.normalize("NFKC", text).lower()
    return _PUNCT.sub(" ", text).strip()


_ALIASES: dict[str, str] = {}
for _s in STRUCTURES:
    for _alias in (_s.key, _s.en, _s.zh, *_s.synonyms):
        _ALIASES.setdefault(normalize(_alias), _s.key)
        _ALIASES.setdefault(normalize(_alias).replace(" ", ""), _s.key)


def canonical(name: str) -> str | None:
    """The vocabulary key a free-text name refers to, in either language, or None."""
    norm = normalize(name)
    return _ALIASES.get(norm) or _ALIASES.get(norm.replace(" ", ""))


def names_match(predicted: str, truth: str) -> bool:
    """Strict name match after normalisation, synonyms and the zh/en table (SPEC §6)."""
    p, t = canonical(predicted), canonical(truth)
    if p is not None and t is not None:
        return p == t
    return normalize(predicted) == normalize(truth)


def names_match_lenient(predicted: str, truth: str) -> bool:
    """The authors' released rule, as a named compatibility mode: substring either way."""
    p, t = normalize(predicted), normalize(truth)
    return bool(p) and bool(t) and (p in t or t in p)
