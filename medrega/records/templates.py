"""Question templates and base prompts for the region tasks, in English and Chinese (SPEC §3).

Placeholders: `{modality}` (display name of the modality in the record's language), `{region}`
(a `<box>[[..]]</box>` string, Region-to-Text) and `{objects}` (one or more `<ref>name</ref>`,
Text-to-Region). Every template of a task uses that task's placeholder exactly once, so the
builder can pick any of them; the tests check this.
"""
from __future__ import annotations

TEMPLATES: dict[str, dict[str, list[str]]] = {
    "caption": {
        "en": [
            "Describe this {modality} image briefly.",
            "Give a short caption for this {modality} image.",
            "What does this {modality} image show?",
            "Summarize the content of this medical image.",
            "Write a brief description of the image.",
            "Which structures are visible in this {modality} image?",
            "Provide a concise caption for the medical image.",
            "What is shown in this picture?",
            "Briefly describe what you see in this scan.",
            "Caption this {modality} image.",
            "What can be seen in this medical image?",
            "Please describe the image in one sentence.",
            "Tell me what this {modality} image contains.",
            "Give a one-line summary of this image.",
            "What kind of image is this and what does it show?",
            "Describe the visible anatomy in this image.",
            "Offer a short description of this {modality} study.",
            "What does the image depict?",
            "Can you caption this medical image?",
            "Explain briefly what this image shows.",
            "Name the image type and the structures it shows.",
            "Provide a brief overview of this {modality} image.",
        ],
        "zh": [
            "请简要描述这张{modality}图像。",
            "请为这张{modality}图像写一句简短的说明。",
            "这张{modality}图像显示了什么？",
            "请概括这张医学影像的内容。",
            "简单描述一下这张图像。",
            "这张{modality}图像中可以看到哪些结构？",
            "请为这张医学影像生成简洁的描述。",
            "图中显示的是什么？",
            "请简要说明你在这张影像中看到的内容。",
            "给这张{modality}图像配一句说明。",
            "这张医学影像中能看到什么？",
            "请用一句话描述这张图像。",
            "告诉我这张{modality}图像包含哪些内容。",
            "请用一句话总结这张图像。",
            "这是什么类型的图像？显示了什么？",
            "请描述图像中可见的解剖结构。",
            "请对这次{modality}检查的图像做简短描述。",
            "这张图像描绘了什么？",
            "你能为这张医学影像写个说明吗？",
            "请简要解释这张图像显示的内容。",
            "请说出图像类型以及其中显示的结构。",
            "请简要概述这张{modality}图像。",
        ],
    },
    "r2t": {
        "en": [
            "What can be visualized in the {region} of this medical scan?",
            "What is <ref>this</ref>{region} in this {modality} image?",
            "Identify the structure inside {region}.",
            "Which organ or lesion is located at {region}?",
            "What does the region {region} show?",
            "Name the object in {region} of this image.",
            "What anatomical structure is enclosed by {region}?",
            "Tell me what is in the area {region}.",
            "What is found within the bounding box {region}?",
            "Recognize the object in the region {region}.",
            "Please identify what appears in {region} of this {modality} image.",
            "What structure does the box {region} mark?",
            "Can you tell what lies in {region}?",
            "Classify the content of region {region}.",
            "What is depicted inside {region} on this scan?",
            "Which structure occupies {region}?",
            "Look at {region}. What is it?",
            "What is the name of the structure highlighted by {region}?",
            "Describe in a word or phrase what {region} contains.",
            "In this {modality} image, what is at {region}?",
            "What object is shown in the marked region {region}?",
            "Identify the region {region} in this medical image.",
        ],
        "zh": [
            "这张医学影像中{region}区域显示的是什么？",
            "这张{modality}图像中<ref>这个</ref>{region}是什么？",
            "请识别{region}中的结构。",
            "位于{region}的是哪个器官或病变？",
            "{region}区域显示了什么？",
            "请说出图像中{region}内的目标名称。",
            "{region}框住的是什么解剖结构？",
            "告诉我{region}区域里是什么。",
            "边界框{region}内是什么？",
            "请识别区域{region}中的目标。",
            "请判断这张{modality}图像中{region}处是什么。",
            "边界框{region}标出的是什么结构？",
            "你能说出{region}里是什么吗？",
            "请对区域{region}的内容进行分类。",
            "这张影像上{region}内显示的是什么？",
            "哪个结构占据了{region}？",
            "看一下{region}，这是什么？",
            "{region}标示的结构叫什么名字？",
            "请用词或短语说明{region}包含什么。",
            "在这张{modality}图像中，{region}处是什么？",
            "标记区域{region}中显示的是什么目标？",
            "请识别这张医学影像中的区域{region}。",
        ],
    },
    "t2r": {
        "en": [
            "Could you specify the corner points for a bounding box surrounding {objects}?",
            "Where can {objects} be seen in this {modality} image?",
            "Locate {objects} in this image.",
            "Please give the bounding box of {objects}.",
            "Find {objects} and output the bounding boxes.",
            "Detect {objects} in this medical scan.",
            "What are the coordinates of {objects}?",
            "Mark the region of {objects} with a bounding box.",
            "Can you localize {objects} in this {modality} image?",
            "Show me the location of {objects}.",
            "Provide the box coordinates for {objects}.",
            "Draw a bounding box around {objects}.",
            "In this scan, where can {objects} be found?",
            "Identify the location of {objects} in the image.",
            "Output the bounding box of {objects} in this {modality} image.",
            "Please detect and box {objects}.",
            "Give the position of {objects} as bounding boxes.",
            "Pinpoint {objects} in this picture.",
            "Point out {objects} with bounding boxes.",
            "Find the region corresponding to {objects}.",
            "Which area of the image contains {objects}?",
            "Locate every instance of {objects} in this medical image.",
        ],
        "zh": [
            "请给出包围{objects}的边界框坐标。",
            "这张{modality}图像中{objects}在哪里？",
            "请在图像中定位{objects}。",
            "请给出{objects}的边界框。",
            "找到{objects}并输出其边界框。",
            "请检测这张医学影像中的{objects}。",
            "{objects}的坐标是多少？",
            "请用边界框标出{objects}所在的区域。",
            "你能在这张{modality}图像中定位{objects}吗？",
            "告诉我{objects}位于哪里。",
            "请提供{objects}的边界框坐标。",
            "请在{objects}周围画出边界框。",
            "这张影像中哪里可以看到{objects}？",
            "请确定{objects}在图像中的位置。",
            "请输出这张{modality}图像中{objects}的边界框。",
            "请检测并框出{objects}。",
            "请以边界框形式给出{objects}的位置。",
            "{objects}在这张图中的具体位置在哪里？",
            "请用边界框指出{objects}。",
            "请找出与{objects}对应的区域。",
            "图像的哪个区域包含{objects}？",
            "请定位这张医学影像中{objects}的所有区域。",
        ],
    },
}

_BOX_EN = ("The region is represented in the form of bounding box, [x1, y1, x2, y2], with integers "
           "ranging from 0 to 999. These values correspond to the top left x, top left y, bottom "
           "right x, and bottom right y.")
_BOX_ZH = "区域用边界框的形式表示，[x1, y1, x2, y2]，整数范围从0到999。这些值分别对应左上角x、左上角y、右下角x和右下角y。"

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
}

PLACEHOLDER = {"caption": None, "r2t": "{region}", "t2r": "{objects}"}
