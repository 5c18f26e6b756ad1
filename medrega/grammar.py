"""MedRegA's text format (SPEC §1-3): the one writer and the one reader of it.

Everything that puts boxes, names, the image placeholder, base prompts or chat framing into text
(record builders, prompts, the served model) and everything that reads them back (validation,
the evaluator, baselines, the released-data importer) goes through this module, so the two sides
can never drift apart:

- boxes on the 0-999 grid: `encode_box`/`decode_box`, `format_*`, and `parse_regions`, a
  forgiving parser that never raises (it reads raw model output);
- `<ref>`/`<box>` structure: `ref_names`, `box_bodies`, `tags_balanced`, `strip_regions`;
- the `<image>` placeholder of InternVL records and its expansion into image tokens;
- language detection (one CJK range for every caller);
- the base prompts of every task, in English and Chinese;
- the chat framing (ChatML, the format of InternVL's Hermes-2, InternLM2 and Qwen2 models) as the
  tokenizer's chat template, and the special tokens a user's text must never carry.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

# Released prompts and evaluator use integers 0..999 (the paper's "[0, 1000)" is the same
# set of integers, but we scale by 999 so that the right/bottom edge maps to 999 exactly).
GRID = 999


def _clamp(v: int) -> int:
    return max(0, min(GRID, v))


def encode_box(box_xyxy, width: float, height: float) -> list[int]:
    """Pixel box [x1, y1, x2, y2] on the original image -> grid integers, clamped to 0..999.

    Python's round() (half to even) is used because SPEC §2 writes the rule as round();
    either tie rule stays within half a grid cell of the true position.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    x1, y1, x2, y2 = box_xyxy
    return [
        _clamp(round(x1 / width * GRID)),
        _clamp(round(y1 / height * GRID)),
        _clamp(round(x2 / width * GRID)),
        _clamp(round(y2 / height * GRID)),
    ]


def decode_box(grid_box, width: float, height: float) -> list[float]:
    """Grid integers -> pixel coordinates on the original image (x / 999 * W)."""
    x1, y1, x2, y2 = grid_box
    return [x1 / GRID * width, y1 / GRID * height, x2 / GRID * width, y2 / GRID * height]


def format_box(boxes) -> str:
    """`<box>[[x1, y1, x2, y2], [..]]</box>` with the ", " separators of the SPEC examples."""
    inner = ", ".join("[" + ", ".join(str(int(v)) for v in b) + "]" for b in boxes)
    return f"<box>[{inner}]</box>"


def format_region(name: str, boxes) -> str:
    return f"<ref>{name}</ref>{format_box(boxes)}"


def format_regions(regions) -> str:
    """Several objects, each `(name, boxes)`, joined by ", " (SPEC §2)."""
    return ", ".join(format_region(name, boxes) for name, boxes in regions)


@dataclass
class ParseResult:
    # One entry per valid box; the name is the <ref> that introduced its <box> group, or None.
    regions: list[tuple[str | None, list[int]]] = field(default_factory=list)
    # False when no valid box was found or any box syntax was malformed.
    ok: bool = False
    # Grounded-report description after the last box (`: ...` / `：...`), else None.
    text: str | None = None
    # Boxes that were written but rejected (bad syntax, out of range, empty area). The
    # evaluator counts them as predictions so a garbage box cannot raise precision.
    n_invalid: int = 0
    # True when the boxes were read from bare `name[[..]]` text (no <ref>/<box> tags), by
    # `parse_answer_regions`; `parse_regions` never sets it.
    untagged: bool = False

    @property
    def boxes(self) -> list[list[int]]:
        return [box for _, box in self.regions]


# A <ref> or a <box> group, in reading order. Non-greedy so adjacent groups stay separate.
_TOKEN = re.compile(r"<ref>(?P<ref>.*?)</ref>|<box>(?P<box>.*?)</box>", re.DOTALL)
# The list of boxes inside <box>..</box>: "[[a, b, c, d], [..]]". A single "[a, b, c, d]"
# is also accepted: it is unambiguous and models trained on the double form do emit it.
_INNER = re.compile(r"\[([^\[\]]*)\]")
_OUTER_DOUBLE = re.compile(r"^\[\s*\[[^\[\]]*\](?:\s*,\s*\[[^\[\]]*\])*\s*\]$")
_OUTER_SINGLE = re.compile(r"^\[[^\[\]]*\]$")
# At most 6 digits: keeps int() far away from Python's huge-integer conversion limit.
_INT = re.compile(r"^\s*(-?\d{1,6})\s*$")
_DESCRIPTION = re.compile(r"^\s*[:：]\s*(.*)$", re.DOTALL)


def _parse_one(coords: str) -> list[int] | None:
    """`a, b, c, d` -> a valid grid box, or None (wrong arity, non-integer, range, area)."""
    parts = coords.split(",")
    if len(parts) != 4:
        return None
    values = []
    for p in parts:
        m = _INT.match(p)
        if not m:
            return None
        values.append(int(m.group(1)))
    x1, y1, x2, y2 = values
    if not all(0 <= v <= GRID for v in values) or x1 >= x2 or y1 >= y2:
        return None
    return values


def parse_box_body(body: str) -> tuple[list[list[int]], int, bool]:
    """Contents of one <box>: (valid boxes, number of rejected boxes, syntax ok)."""
    body = body.strip()
    if _OUTER_DOUBLE.match(body) or _OUTER_SINGLE.match(body):
        chunks = _INNER.findall(body)
    else:
        # Unreadable bracket structure: count it as one rejected box.
        return [], 1, False
    valid, invalid = [], 0
    for chunk in chunks:
        box = _parse_one(chunk)
        if box is None:
            invalid += 1
        else:
            valid.append(box)
    return valid, invalid, invalid == 0


def parse_regions(text) -> ParseResult:
    """Read `<ref>name</ref><box>[[..]]</box>` groups from free text. Never raises."""
    result = ParseResult()
    if not isinstance(text, str):
        return result
    malformed = False
    pending_name: str | None = None
    last_end = None
    leftover = []  # text outside the matched groups, to spot unclosed tags
    pos = 0
    for m in _TOKEN.finditer(text):
        leftover.append(text[pos:m.start()])
        pos = m.end()
        if m.group("ref") is not None:
            # A ref binds to the next box group only; a later bare box stays unnamed.
            pending_name = m.group("ref").strip()
            continue
        boxes, invalid, good = parse_box_body(m.group("box"))
        malformed |= not good
        result.n_invalid += invalid
        result.regions.extend((pending_name, b) for b in boxes)
        pending_name = None
        last_end = m.end()
    leftover.append(text[pos:])
    rest = "".join(leftover)
    if "<box>" in rest or "</box>" in rest:
        # An unclosed or stray box tag: a box was attempted but cannot be read.
        malformed = True
        result.n_invalid += rest.count("<box>")
    return _finish(result, text, last_end, malformed)


def _finish(result: ParseResult, text: str, last_end: int | None, malformed: bool) -> ParseResult:
    """The grounded-report description after the last box, and the verdict."""
    if last_end is not None:
        d = _DESCRIPTION.match(text[last_end:])
        if d:
            result.text = d.group(1).strip()
    result.ok = bool(result.regions) and not malformed
    return result


# --- answers decoded without their special tokens (SPEC §6) -------------------------------
# The authors' inference decodes with special tokens skipped, so `<ref>liver</ref><box>[[..]]</box>`
# reaches their answers files as `liver[[..]]`. `parse_answer_regions` reads such an answer for
# our protocol: only when it has no <box> tag at all, each bare `[[..]]` list is one box group and
# its name is the text since the previous list (or the start), trimmed of separators.
_BARE_LIST = re.compile(r"\[\s*\[[^\[\]]*\](?:\s*,\s*\[[^\[\]]*\])*\s*\]")
_REF_TAGS = re.compile(r"</?ref>")
_NAME_TRIM = " \t\r\n,，;；、:："


def _untagged_name(segment: str) -> str | None:
    name = _REF_TAGS.sub("", segment).strip(_NAME_TRIM)
    return name or None


def parse_answer_regions(text) -> ParseResult:
    """A model answer: `parse_regions`, or, for an answer without any <box> tag, its bare
    `name[[x1, y1, x2, y2]], name[[..]]` groups (`untagged` set). Never raises."""
    tagged = parse_regions(text)
    if not isinstance(text, str) or "<box>" in text or "</box>" in text:
        return tagged
    lists = list(_BARE_LIST.finditer(text))
    if not lists:
        return tagged
    result = ParseResult(untagged=True)
    malformed, pos = False, 0
    for m in lists:
        boxes, invalid, good = parse_box_body(m.group(0))
        malformed |= not good
        result.n_invalid += invalid
        name = _untagged_name(text[pos:m.start()])
        result.regions.extend((name, b) for b in boxes)
        pos = m.end()
    return _finish(result, text, pos, malformed)


# -- <ref>/<box> structure ----------------------------------------------------------------------

_TAG = re.compile(r"</?(ref|box)>")
_REF = re.compile(r"<ref>(.*?)</ref>", re.DOTALL)
_BOX = re.compile(r"<box>(.*?)</box>", re.DOTALL)
_REGION = re.compile(r"<ref>.*?</ref>|<box>.*?</box>", re.DOTALL)


def ref_names(text: str) -> list[str]:
    """The names inside `<ref>..</ref>`, in order (e.g. the structures a question asks for)."""
    return [name.strip() for name in _REF.findall(text or "")]


def box_bodies(text: str) -> list[str]:
    """The contents of every `<box>..</box>`, in order."""
    return _BOX.findall(text or "")


def tags_balanced(text: str) -> bool:
    """`<ref>..</ref>` and `<box>..</box>` strictly alternate open/close and never nest."""
    open_tag = None
    for m in _TAG.finditer(text or ""):
        closing, name = m.group(0).startswith("</"), m.group(1)
        if closing:
            if open_tag != name:
                return False
            open_tag = None
        else:
            if open_tag is not None:
                return False
            open_tag = name
    return open_tag is None


def strip_regions(text) -> str:
    """The words of an answer without its `<ref>`/`<box>` groups (a grounded report's text
    when its boxes cannot be read)."""
    return _REGION.sub(" ", text if isinstance(text, str) else "").strip(" :：,，\n")


# -- the image placeholder ----------------------------------------------------------------------

IMAGE = "<image>"  # InternVL records: the first human turn starts with "<image>\n"


def with_image(question: str) -> str:
    """A question as a record's first human turn."""
    return f"{IMAGE}\n{question}"


def without_image(question: str) -> str:
    return question.replace(IMAGE + "\n", "", 1).replace(IMAGE, "", 1).strip()


def count_images(text: str) -> int:
    return (text or "").count(IMAGE)


# -- language -----------------------------------------------------------------------------------

# CJK unified ideographs, extension A and the compatibility block: the one definition of "Chinese"
CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_CJK = re.compile(f"[{CJK}]")


def detect_lang(text: str) -> str:
    """'zh' when the text has any Chinese character, else 'en'."""
    return "zh" if _CJK.search(text or "") else "en"


def has_latin(text: str) -> bool:
    return re.search(r"[A-Za-z]", without_image(text or "")) is not None


# -- base prompts (SPEC §3) ---------------------------------------------------------------------

_BOX_EN = ("The region is represented in the form of bounding box, [x1, y1, x2, y2], with integers "
           "ranging from 0 to 999. These values correspond to the top left x, top left y, bottom "
           "right x, and bottom right y.")
_BOX_ZH = "区域用边界框的形式表示，[x1, y1, x2, y2]，整数范围从0到999。这些值分别对应左上角x、左上角y、右下角x和右下角y。"
VQA_ANSWER = {"en": "Answer the question using a single word or phrase.", "zh": "请用词或短语回答问题。"}

BASE_PROMPTS: dict[str, dict[str, str]] = {
    "caption": {
        "en": "You are a helpful medical assistant. Your task is image captioning. You are required "
              "to describe the given medical image briefly, naming its modality and the visible structures.",
        "zh": "你是一个医疗助手，你的任务是图像描述。请简要描述给定的医学影像，说明其成像方式和可见的结构。",
    },
    # Released Region-to-Text prompt, verbatim (SPEC §3).
    "r2t": {
        "en": "You are a helpful medical assistant. Your task is object recognition. You are required "
              "to recognize the object in the given region. " + _BOX_EN,
        "zh": "你是一个医疗助手，你的任务是目标识别。你需要识别给定区域中的目标。" + _BOX_ZH,
    },
    # Text-to-Region: the same box description plus the answer format sentence.
    "t2r": {
        "en": "You are a helpful medical assistant. Your task is object detection. You are required "
              "to locate the given objects in the image. " + _BOX_EN + " Answer in the form "
              "<ref>object</ref><box>[[x1, y1, x2, y2]]</box>; list several boxes of one object "
              "inside one <box>, and separate different objects with commas.",
        "zh": "你是一个医疗助手，你的任务是定位目标。你需要在图像中定位给定的目标。" + _BOX_ZH
              + "请按<ref>目标</ref><box>[[x1, y1, x2, y2]]</box>的格式回答；同一目标的多个区域写在同一个<box>中，"
              "不同目标之间用逗号分隔。",
    },
    # The released Chinese lesion prompt begins as SPEC §3 quotes; English mirrors it.
    "grounded": {
        "en": "You are a helpful medical assistant. Your task is to locate and describe the organs "
              "or lesions named in the question. " + _BOX_EN + " Answer in the form "
              "<ref>object</ref><box>[[x1, y1, x2, y2]]</box>, followed by a colon and the description.",
        "zh": "你是一个医疗助手，你的任务是定位并描述病种。病种区域用边界框的形式表示，[x1, y1, x2, y2]，整数范围从0到999。"
              "这些值分别对应左上角x、左上角y、右下角x和右下角y。请按<ref>目标</ref><box>[[x1, y1, x2, y2]]</box>：描述 的格式回答。",
    },
    "vqa": {
        "en": "You are a helpful medical assistant. Your task is visual question answering. "
              "Answer the question about the given medical image. " + VQA_ANSWER["en"],
        "zh": "你是一个医疗助手，你的任务是视觉问答。请回答关于给定医学影像的问题。" + VQA_ANSWER["zh"],
    },
    "report": {
        "en": "You are a helpful medical assistant. Your task is report generation. Write the report "
              "of the given medical image in the form \"Findings: ... Impression: ...\".",
        "zh": "你是一个医疗助手，你的任务是报告生成。请按“影像诊断：… 影像结论：…”的格式撰写给定医学影像的报告。",
    },
    "cls": {
        "en": "You are a helpful medical assistant. Your task is image classification. Answer with "
              "exactly one of the labels listed in the question.",
        "zh": "你是一个医疗助手，你的任务是图像分类。请只用问题中列出的一个标签回答。",
    },
}


def base_prompt(task: str | None, lang: str) -> str | None:
    """The base prompt of a task in a language, or None for an unknown task."""
    return (BASE_PROMPTS.get(task or "") or {}).get(lang)


# -- chat framing -------------------------------------------------------------------------------

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
REGION_TOKENS = ("<ref>", "</ref>", "<box>", "</box>")
SPECIAL_TOKENS = (PAD, IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT, *REGION_TOKENS)
# What a user's text may not contain: it would forge image slots or turn boundaries. The region
# tags are the task's own language (a Region-to-Text question carries a <box>).
FORBIDDEN_IN_USER_TEXT = tuple(t for t in SPECIAL_TOKENS if t not in REGION_TOKENS) + ("<|", "|>")

# ChatML. The tiny tokenizer ships it; imported checkpoints carry their own (same framing, with
# their system message); prompts are always built through the tokenizer's template.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def user_text(question: str, base: str | None) -> str:
    """SPEC §1: "<image>\n" + base_prompt + " " + question."""
    q = without_image(question)
    return with_image(f"{base} {q}" if base else q)


def expand_image(text: str, num_image_tokens: int) -> str:
    """The placeholder becomes `<img>` + N x `<IMG_CONTEXT>` + `</img>` (one tile)."""
    return text.replace(IMAGE, IMG_START + IMG_CONTEXT * num_image_tokens + IMG_END, 1)


def forbidden_tokens(text: str) -> list[str]:
    """The special tokens a piece of user text carries (empty when it is safe to frame)."""
    return [t for t in FORBIDDEN_IN_USER_TEXT if t in (text or "")]
