"""Short bilingual radiology sentences per structure and lesion: what the synthetic reports say.

The sentences are chosen to be true of the synthetic scenes (medrega.sources.synthetic.SCENES):
lesions are placed where the text says (image left = patient right, the radiological
convention), and a lesion drawn as several components is described as multiple. Wording is
modality-aware where the physics differs (CT density, MR signal, ultrasound echo, X-ray opacity).

Absence is only claimed for sources whose annotation is exhaustive (every structure drawn is
labelled: the synthetic scenes). For real scans whose masks were derived for one structure
(the package scans), `structure_sentence` falls back to a neutral "X is shown" and the
impression says that no lesion was annotated, so no record asserts a diagnosis nobody made.
"""
from __future__ import annotations

from medrega.vocab import BY_KEY

# key -> (English, Chinese): normal-appearance sentence for an exhaustively labelled structure.
NORMAL: dict[str, tuple[str, str]] = {
    "liver": ("The liver is normal in size and contour.", "肝脏大小、形态正常。"),
    "spleen": ("The spleen is not enlarged.", "脾脏不大。"),
    "right_kidney": ("The right kidney is normal in size and position.", "右肾大小、位置正常。"),
    "left_kidney": ("The left kidney is normal in size and position.", "左肾大小、位置正常。"),
    "stomach": ("The stomach is unremarkable.", "胃未见明显异常。"),
    "pancreas": ("The pancreas is normal in size.", "胰腺大小正常。"),
    "aorta": ("The aorta is normal in caliber.", "主动脉管径正常。"),
    "gallbladder": ("The gallbladder is not distended and its wall is not thickened.", "胆囊不大，壁不厚。"),
    "bladder": ("The urinary bladder is well distended.", "膀胱充盈良好。"),
    "right_lung": ("The right lung is clear.", "右肺清晰。"),
    "left_lung": ("The left lung is clear.", "左肺清晰。"),
    "heart": ("The heart size is normal.", "心脏大小正常。"),
    "left_ventricle": ("The left ventricle is normal in size.", "左心室大小正常。"),
    "right_ventricle": ("The right ventricle is normal in size.", "右心室大小正常。"),
    "myocardium": ("The left ventricular myocardium is of normal thickness.", "左心室心肌厚度正常。"),
    "brain": ("The brain parenchyma shows no focal abnormality.", "脑实质未见局灶性异常。"),
    "optic_disc": ("The optic disc has a sharp margin.", "视盘边界清晰。"),
    "macula": ("The macula is visible with a preserved foveal reflex.", "黄斑可见，中心凹反光存在。"),
    "retina": ("The retinal layers are continuous.", "视网膜各层结构连续。"),
    "nucleus": ("Scattered cell nuclei are seen.", "可见散在细胞核。"),
    "gland": ("A gland with regular architecture is seen.", "可见结构规则的腺体。"),
}

# lesion key -> modality (or "*") -> (en one, en several, zh one, zh several)
LESION: dict[str, dict[str, tuple[str, str, str, str]]] = {
    "liver_tumor": {
        "ct": ("A hypodense lesion in the right lobe of the liver.",
               "Multiple hypodense lesions in the right lobe of the liver.",
               "肝右叶见低密度灶。", "肝右叶见多发低密度灶。"),
        "mr": ("A T2 hyperintense lesion in the right lobe of the liver.",
               "Multiple T2 hyperintense lesions in the right lobe of the liver.",
               "肝右叶见T2高信号灶。", "肝右叶见多发T2高信号灶。"),
    },
    "kidney_tumor": {"*": ("A solid mass in the left kidney.", "Multiple solid masses in the left kidney.",
                           "左肾见实性肿块。", "左肾见多发实性肿块。")},
    "pancreatic_cancer": {"*": ("A hypodense mass in the tail of the pancreas.",
                                "Multiple hypodense masses in the tail of the pancreas.",
                                "胰尾部见低密度肿块。", "胰尾部见多发低密度肿块。")},
    "lung_nodule": {
        "ct": ("A solid nodule in the upper lobe of the right lung.",
               "Multiple solid nodules in the upper lobe of the right lung.",
               "右肺上叶见实性结节。", "右肺上叶见多发实性结节。"),
        "xray": ("A nodular opacity in the right upper lung zone.",
                 "Multiple nodular opacities in the right upper lung zone.",
                 "右上肺野见结节影。", "右上肺野见多发结节影。"),
    },
    "brain_tumor": {"*": ("A hyperintense mass in the right frontal lobe.",
                          "Multiple hyperintense masses in the right frontal lobe.",
                          "右额叶见高信号肿块。", "右额叶见多发高信号肿块。")},
    "skin_lesion": {"*": ("A pigmented lesion with irregular borders.",
                          "A pigmented lesion with irregular borders and satellite foci.",
                          "见边界不规则的色素性病变。", "见边界不规则的色素性病变，伴卫星灶。")},
    "fluid": {"*": ("A pocket of intraretinal fluid in the central retina.",
                    "Multiple pockets of intraretinal fluid in the central retina.",
                    "中央视网膜见视网膜内积液。", "中央视网膜见多处视网膜内积液。")},
    "hemorrhage": {"*": ("A retinal hemorrhage above the macula.", "Multiple retinal hemorrhages above the macula.",
                         "黄斑上方见视网膜出血。", "黄斑上方见多发视网膜出血。")},
}

# lesion key -> (English, Chinese) impression line
IMPRESSION: dict[str, tuple[str, str]] = {
    "liver_tumor": ("Liver lesion, suspicious for neoplasm.", "肝脏占位，考虑肿瘤性病变。"),
    "kidney_tumor": ("Left renal mass, suspicious for renal cell carcinoma.", "左肾占位，考虑肾癌可能。"),
    "pancreatic_cancer": ("Pancreatic tail mass, suspicious for pancreatic cancer.", "胰尾占位，考虑胰腺癌。"),
    "lung_nodule": ("Right lung nodule; follow-up is recommended.", "右肺结节，建议随访。"),
    "brain_tumor": ("Intracranial mass, suspicious for neoplasm.", "颅内占位，考虑肿瘤性病变。"),
    "skin_lesion": ("Pigmented skin lesion; dermatology review is advised.", "色素性皮肤病变，建议皮肤科随诊。"),
    "fluid": ("Intraretinal fluid.", "视网膜内积液。"),
    "hemorrhage": ("Retinal hemorrhage.", "视网膜出血。"),
}
NO_ABNORMALITY = ("No abnormality detected.", "未见明显异常。")

# Import-time check: every vocabulary entry has its sentence, so a new structure cannot reach a
# report without text (the reports reader would then reject the file).
for _key, _s in BY_KEY.items():
    assert (_key in LESION and _key in IMPRESSION) if _s.lesion else _key in NORMAL, _key


def structure_sentence(key: str, modality: str, n_regions: int, exhaustive: bool) -> tuple[str, str]:
    """(English, Chinese) sentence about structure `key` seen as `n_regions` components."""
    s = BY_KEY[key]
    if s.lesion:
        table = LESION[key]
        en1, en2, zh1, zh2 = table.get(modality) or table.get("*") or next(iter(table.values()))
        return (en2, zh2) if n_regions > 1 else (en1, zh1)
    if not exhaustive:
        return f"The {s.en} is shown.", f"可见{s.zh}。"
    return NORMAL[key]


def impression(keys: list[str], exhaustive: bool) -> tuple[str, str]:
    """(English, Chinese) impression: one line per lesion, else a normal or neutral statement."""
    lesions = [k for k in keys if BY_KEY[k].lesion]
    if lesions:
        return " ".join(IMPRESSION[k][0] for k in lesions), "".join(IMPRESSION[k][1] for k in lesions)
    if exhaustive:
        return NO_ABNORMALITY
    names_en = ", ".join(BY_KEY[k].en for k in keys)
    names_zh = "、".join(BY_KEY[k].zh for k in keys)
    return (f"{names_en[0].upper() + names_en[1:]} shown; no lesion annotated.",
            f"可见{names_zh}，未标注病变。")
