"""Loading VQA sets (VQAv2 pair, GQA-style JSON, JSONL) and caption sets (COCO captions JSON,
JSONL); format detection and errors, including each task refusing the other's files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlprune.eval.vqa_data import (
    CaptionRecord,
    VQARecord,
    detect_caption_format,
    detect_format,
    load_captions,
    load_vqa,
    missing_images,
)

# --------------------------------------------------------------------------------------------
# VQAv2
# --------------------------------------------------------------------------------------------

ANSWERS_42 = ["2", "2", "two", "2", "3", "2", "2", "2", "2", "2"]
ANSWERS_7 = ["yes"] * 10


def _write_json(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def _vqav2(root: Path, *, subtype: str | None = "val2014", image_names: list[str] | None = None,
           annotations_name: str = "v2_mscoco_val2014_annotations.json",
           image_dir: str = "val2014") -> Path:
    questions = {"questions": [
        {"image_id": 42, "question": "How many dogs?", "question_id": 420},
        {"image_id": 7, "question": "Is it sunny?", "question_id": 70},
        {"image_id": 42, "question": "What color is the dog?", "question_id": 421},
    ]}
    if subtype is not None:
        questions["data_subtype"] = subtype
    annotations = {"annotations": [
        {"question_id": 70, "image_id": 7, "multiple_choice_answer": "yes",
         "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(ANSWERS_7)]},
        {"question_id": 420, "image_id": 42, "multiple_choice_answer": "2",
         "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(ANSWERS_42)]},
        {"question_id": 421, "image_id": 42, "multiple_choice_answer": "brown",
         "answers": [{"answer": "brown", "answer_id": i + 1} for i in range(10)]},
    ]}
    qpath = _write_json(root / "v2_OpenEnded_mscoco_val2014_questions.json", questions)
    _write_json(root / annotations_name, annotations)
    images = root / image_dir
    images.mkdir(parents=True, exist_ok=True)
    names = image_names if image_names is not None else [
        "COCO_val2014_000000000042.jpg", "COCO_val2014_000000000007.jpg"]
    for name in names:
        (images / name).write_bytes(b"")
    return qpath


def test_vqav2_defaults(tmp_path: Path) -> None:
    qpath = _vqav2(tmp_path)
    assert detect_format(qpath) == "vqav2"
    records = load_vqa(qpath)  # annotations found next to it, images in ./val2014
    assert [r.question_id for r in records] == [420, 70, 421]  # questions file order
    first = records[0]
    assert isinstance(first, VQARecord)
    assert first.image == tmp_path / "val2014" / "COCO_val2014_000000000042.jpg"
    assert first.question == "How many dogs?"
    assert first.answers == ANSWERS_42  # all 10 raw answers, in order
    assert records[1].image.name == "COCO_val2014_000000000007.jpg"
    assert records[1].answers == ANSWERS_7
    assert missing_images(records) == []


def test_vqav2_limit(tmp_path: Path) -> None:
    records = load_vqa(_vqav2(tmp_path), limit=2)
    assert [r.question_id for r in records] == [420, 70]
    assert load_vqa(_vqav2(tmp_path / "b"), limit=0) == []


def test_vqav2_coco2017_names(tmp_path: Path) -> None:
    # 2017 folders name images by the 12-digit id alone
    qpath = _vqav2(tmp_path, image_names=["000000000042.jpg", "000000000007.jpg"],
                   image_dir="imgs")
    records = load_vqa(qpath, tmp_path / "imgs")
    assert records[0].image == tmp_path / "imgs" / "000000000042.jpg"


def test_vqav2_prefix_from_folder_without_subtype(tmp_path: Path) -> None:
    qpath = _vqav2(tmp_path, subtype=None, image_names=["COCO_test2015_000000000001.png"],
                   image_dir="imgs")
    records = load_vqa(qpath, tmp_path / "imgs",
                       annotations=tmp_path / "v2_mscoco_val2014_annotations.json")
    # the one naming found in the folder is used, extension included
    assert records[0].image == tmp_path / "imgs" / "COCO_test2015_000000000042.png"


def test_vqav2_mixed_folder_picks_subtype(tmp_path: Path) -> None:
    qpath = _vqav2(tmp_path, image_names=["COCO_train2014_000000000009.jpg",
                                          "COCO_val2014_000000000042.jpg"])
    assert load_vqa(qpath)[0].image.name == "COCO_val2014_000000000042.jpg"


def test_vqav2_mixed_folder_without_subtype_asks_for_pattern(tmp_path: Path) -> None:
    qpath = _vqav2(tmp_path, subtype=None, image_dir="imgs",
                   image_names=["COCO_train2014_000000000009.jpg",
                                "COCO_val2014_000000000042.jpg"])
    with pytest.raises(ValueError, match="image_pattern"):
        load_vqa(qpath, tmp_path / "imgs")


def test_vqav2_folder_of_other_split(tmp_path: Path) -> None:
    qpath = _vqav2(tmp_path, image_names=["COCO_train2014_000000000042.jpg"])
    with pytest.raises(ValueError, match="val2014.*COCO_train2014_"):
        load_vqa(qpath)


def test_vqav2_no_coco_images(tmp_path: Path) -> None:
    qpath = _vqav2(tmp_path, image_names=["cat.jpg"])
    with pytest.raises(ValueError, match="no COCO-named image"):
        load_vqa(qpath)


def test_vqav2_image_pattern(tmp_path: Path) -> None:
    qpath = _vqav2(tmp_path, image_names=[])
    records = load_vqa(qpath, image_pattern="img_{image_id}.png")
    assert records[0].image == tmp_path / "val2014" / "img_42.png"
    with pytest.raises(ValueError, match="image_pattern"):
        load_vqa(qpath, image_pattern="{id}.jpg")


def test_vqav2_missing_images(tmp_path: Path) -> None:
    qpath = _vqav2(tmp_path, image_names=["COCO_val2014_000000000042.jpg"])  # no image 7
    records = load_vqa(qpath)
    missing = missing_images(records)
    assert [r.question_id for r in missing] == [70]
    assert len(records) == 3  # loading keeps them; the caller decides


def test_vqav2_annotations_argument_and_ambiguity(tmp_path: Path) -> None:
    qpath = _vqav2(tmp_path, subtype=None, annotations_name="a_annotations.json")
    _write_json(tmp_path / "b_annotations.json", {"annotations": []})
    with pytest.raises(FileNotFoundError, match="annotations="):
        load_vqa(qpath)
    # no data_subtype: the image folder defaults to the questions' folder, so name it
    records = load_vqa(qpath, tmp_path / "val2014", annotations=tmp_path / "a_annotations.json")
    assert len(records) == 3
    assert records[0].image == tmp_path / "val2014" / "COCO_val2014_000000000042.jpg"
    with pytest.raises(FileNotFoundError, match="annotations file not found"):
        load_vqa(qpath, annotations=tmp_path / "nope.json")


def test_vqav2_question_without_annotation(tmp_path: Path) -> None:
    qpath = _vqav2(tmp_path)
    apath = tmp_path / "v2_mscoco_val2014_annotations.json"
    data = json.loads(apath.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["question_id"] != 70]
    apath.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"question_id 70.*no annotation"):
        load_vqa(qpath)


def test_vqav2_bad_question_entry(tmp_path: Path) -> None:
    qpath = _vqav2(tmp_path)
    data = json.loads(qpath.read_text())
    del data["questions"][1]["question"]
    qpath.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"questions\[1\].*missing key 'question'"):
        load_vqa(qpath)


def test_vqav2_annotations_file_as_path(tmp_path: Path) -> None:
    _vqav2(tmp_path)
    with pytest.raises(ValueError, match="annotations file; pass the questions JSON"):
        load_vqa(tmp_path / "v2_mscoco_val2014_annotations.json")


# --------------------------------------------------------------------------------------------
# GQA
# --------------------------------------------------------------------------------------------


def _gqa(root: Path) -> Path:
    data = {
        "201": {"imageId": "n161313", "question": "Is the cup red?", "answer": "yes",
                "fullAnswer": "Yes, the cup is red."},
        "202": {"imageId": "2354786", "question": "What is on the table?", "answer": "cup"},
    }
    (root / "images").mkdir(parents=True)
    (root / "images" / "n161313.jpg").write_bytes(b"")
    return _write_json(root / "testdev_balanced_questions.json", data)


def test_gqa(tmp_path: Path) -> None:
    path = _gqa(tmp_path)
    assert detect_format(path) == "gqa"
    records = load_vqa(path)
    assert [r.question_id for r in records] == ["201", "202"]
    assert records[0].image == tmp_path / "images" / "n161313.jpg"
    assert records[0].question == "Is the cup red?"
    assert records[0].answers == ["yes"]
    assert [r.question_id for r in missing_images(records)] == ["202"]
    assert len(load_vqa(path, limit=1)) == 1


def test_gqa_images_and_pattern(tmp_path: Path) -> None:
    path = _gqa(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    records = load_vqa(path, other, image_pattern="{image_id}.png")
    assert records[1].image == other / "2354786.png"


def test_gqa_entry_missing_answer(tmp_path: Path) -> None:
    path = _write_json(tmp_path / "q.json", {
        "1": {"imageId": "a", "question": "q?", "answer": "yes"},
        "2": {"imageId": "b", "question": "q?"},
    })
    with pytest.raises(ValueError, match="key '2': missing key 'answer'"):
        load_vqa(path)


# --------------------------------------------------------------------------------------------
# JSONL
# --------------------------------------------------------------------------------------------


def _jsonl(path: Path, lines: list[object | str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_jsonl(tmp_path: Path) -> None:
    absolute = tmp_path / "elsewhere" / "b.jpg"
    path = _jsonl(tmp_path / "set" / "vqa.jsonl", [
        {"image": "imgs/a.jpg", "question": "What?", "answers": ["cat", "a cat"],
         "question_id": "q1"},
        "",  # blank lines are skipped
        {"image": str(absolute), "question": "Which?", "answer": "dog"},
    ])
    assert detect_format(path) == "jsonl"
    records = load_vqa(path)
    assert records[0] == VQARecord("q1", tmp_path / "set" / "imgs" / "a.jpg", "What?",
                                   ["cat", "a cat"])
    # no question_id: the line number (third line of the file)
    assert records[1] == VQARecord(3, absolute, "Which?", ["dog"])
    assert len(missing_images(records)) == 2


def test_jsonl_images_base_and_limit(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "vqa.jsonl", [
        {"image": "a.jpg", "question": "q1?", "answer": "x"},
        {"image": "b.jpg", "question": "q2?", "answer": "y"},
    ])
    base = tmp_path / "base"
    base.mkdir()
    (base / "a.jpg").write_bytes(b"")
    records = load_vqa(path, base, limit=1)
    assert [r.image for r in records] == [base / "a.jpg"]
    assert missing_images(records) == []


def test_jsonl_under_json_name(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "vqa.json", [
        {"image": "a.jpg", "question": "q1?", "answer": "x"},
        {"image": "b.jpg", "question": "q2?", "answer": "y"},
    ])
    assert detect_format(path) == "jsonl"
    assert len(load_vqa(path)) == 2


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"line 2 is not valid JSON"),
        ({"question": "q?", "answer": "x"}, r"line 2: missing key 'image'"),
        ({"image": "a.jpg", "answer": "x"}, r"line 2: missing key 'question'"),
        ({"image": "a.jpg", "question": "q?"}, r"line 2: needs 'answers' .* or 'answer'"),
        ({"image": "a.jpg", "question": "q?", "answers": "x"}, r"line 2: 'answers' must be list"),
        ({"image": "a.jpg", "question": "q?", "answers": []}, r"line 2: 'answers' is empty"),
        ({"image": "a.jpg", "question": "q?", "answers": ["x", 2]},
         r"line 2: answers\[1\] must be str"),
        ({"image": "a.jpg", "question": "q?", "answer": 2}, r"line 2: 'answer' must be str"),
        ({"image": 3, "question": "q?", "answer": "x"}, r"line 2: 'image' must be str"),
        (["a.jpg", "q?", "x"], r"line 2: expected a JSON object"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path: Path, line: object, message: str) -> None:
    path = _jsonl(tmp_path / "vqa.jsonl", [{"image": "a.jpg", "question": "q?", "answer": "x"},
                                           line])
    with pytest.raises(ValueError, match=message):
        load_vqa(path)


def test_duplicate_question_ids(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "vqa.jsonl", [
        {"image": "a.jpg", "question": "q1?", "answer": "x", "question_id": 5},
        {"image": "b.jpg", "question": "q2?", "answer": "y", "question_id": 5},
    ])
    with pytest.raises(ValueError, match="question_id 5 appears more than once"):
        load_vqa(path)


# --------------------------------------------------------------------------------------------
# Detection and arguments
# --------------------------------------------------------------------------------------------


def test_unrecognised_files_list_accepted_formats(tmp_path: Path) -> None:
    for name, content in [("list.json", "[1, 2]"), ("obj.json", '{"foo": 1}'),
                          ("text.json", "hello")]:
        path = tmp_path / name
        path.write_text(content)
        with pytest.raises(ValueError, match="accepted formats: 'vqav2'.*'gqa'.*'jsonl'"):
            load_vqa(path)


def test_format_argument(tmp_path: Path) -> None:
    path = _gqa(tmp_path)
    assert len(load_vqa(path, format="gqa")) == 2
    with pytest.raises(ValueError, match="looks like 'gqa'"):
        load_vqa(path, format="vqav2")
    with pytest.raises(ValueError, match=r"format must be one of \['vqav2', 'gqa', 'jsonl'\]"):
        load_vqa(path, format="coco")
    with pytest.raises(ValueError, match="annotations= is only for the 'vqav2' format"):
        load_vqa(path, annotations=path)


def test_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="VQA file not found"):
        load_vqa(tmp_path / "nope.jsonl")
    path = _jsonl(tmp_path / "vqa.jsonl", [{"image": "a.jpg", "question": "q?", "answer": "x"}])
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        load_vqa(path, tmp_path / "no_such_dir")
    with pytest.raises(ValueError, match="limit must be an int >= 0"):
        load_vqa(path, limit=-1)
    with pytest.raises(ValueError, match="image_pattern is only for"):
        load_vqa(path, image_pattern="{image_id}.jpg")


# --------------------------------------------------------------------------------------------
# Captions: COCO captions JSON
# --------------------------------------------------------------------------------------------


def _coco_captions(root: Path, *, name: str = "annotations/captions_val2014.json",
                   image_dir: str | None = "val2014") -> Path:
    data = {
        "info": {}, "licenses": [],
        "images": [{"id": 42, "file_name": "COCO_val2014_000000000042.jpg", "width": 640},
                   {"id": 7, "file_name": "COCO_val2014_000000000007.jpg", "width": 480}],
        "annotations": [
            {"image_id": 7, "id": 1, "caption": "A cat on a mat."},
            {"image_id": 42, "id": 2, "caption": "Two dogs play."},
            {"image_id": 7, "id": 3, "caption": "a sleeping cat"},
            {"image_id": 42, "id": 4, "caption": "dogs in a park"},
        ],
    }
    if image_dir is not None:
        (root / image_dir).mkdir(parents=True, exist_ok=True)
        (root / image_dir / "COCO_val2014_000000000042.jpg").write_bytes(b"")
    return _write_json(root / name, data)


def test_coco_captions(tmp_path: Path) -> None:
    path = _coco_captions(tmp_path)
    assert detect_caption_format(path) == "coco_captions"
    records = load_captions(path)
    # one record per image, in the order of "images"; captions in annotation order;
    # annotations/captions_val2014.json -> images in ../val2014
    assert records == [
        CaptionRecord(42, tmp_path / "val2014" / "COCO_val2014_000000000042.jpg",
                      ["Two dogs play.", "dogs in a park"]),
        CaptionRecord(7, tmp_path / "val2014" / "COCO_val2014_000000000007.jpg",
                      ["A cat on a mat.", "a sleeping cat"]),
    ]
    assert [r.image_id for r in missing_images(records)] == [7]
    assert [r.image_id for r in load_captions(path, limit=1)] == [42]
    assert load_captions(path, format="coco_captions", limit=0) == []


def test_coco_captions_image_folder(tmp_path: Path) -> None:
    # a folder named after the split next to the JSON wins; --images overrides; else the
    # JSON's own folder
    path = _coco_captions(tmp_path, name="captions_val2014.json", image_dir=None)
    assert load_captions(path)[0].image.parent == tmp_path
    (tmp_path / "val2014").mkdir()
    assert load_captions(path)[0].image.parent == tmp_path / "val2014"
    other = tmp_path / "imgs"
    other.mkdir()
    assert load_captions(path, other)[1].image == other / "COCO_val2014_000000000007.jpg"
    plain = _coco_captions(tmp_path / "b", name="karpathy_test.json", image_dir=None)
    assert load_captions(plain)[0].image.parent == tmp_path / "b"


def test_coco_captions_errors(tmp_path: Path) -> None:
    path = _coco_captions(tmp_path)
    data = json.loads(path.read_text())
    data["annotations"].append({"image_id": 99, "caption": "x"})
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"annotations\[4\]: image_id 99 is not in 'images'"):
        load_captions(path)
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] == 42]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"image 7 \(COCO_val2014_000000000007.jpg\) has no caption"):
        load_captions(path)
    assert len(load_captions(path, limit=1)) == 1  # only the kept images need captions
    del data["images"][0]["file_name"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"images\[0\] \(id 42\): missing key 'file_name'"):
        load_captions(path)
    data["images"] = [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"images\[1\]: image id 1 appears more than once"):
        load_captions(path)
    bad_caption = _write_json(tmp_path / "c.json", {
        "images": [{"id": 1, "file_name": "a.jpg"}],
        "annotations": [{"image_id": 1, "caption": ["a", "list"]}]})
    with pytest.raises(ValueError, match=r"annotations\[0\] \(image_id 1\): 'caption' must be str"):
        load_captions(bad_caption)
    no_images = _write_json(tmp_path / "d.json", {"annotations": [{"image_id": 1, "caption": "a"}]})
    with pytest.raises(ValueError, match="needs an 'images' list"):
        load_captions(no_images)


# --------------------------------------------------------------------------------------------
# Captions: JSONL
# --------------------------------------------------------------------------------------------


def test_caption_jsonl(tmp_path: Path) -> None:
    absolute = tmp_path / "elsewhere" / "b.jpg"
    path = _jsonl(tmp_path / "set" / "captions.jsonl", [
        {"image": "imgs/a.jpg", "captions": ["A dog.", "a brown dog"], "id": "a"},
        "",  # blank lines are skipped
        {"image": str(absolute), "caption": "A cat."},
    ])
    assert detect_caption_format(path) == "jsonl"
    records = load_captions(path)
    assert records[0] == CaptionRecord("a", tmp_path / "set" / "imgs" / "a.jpg",
                                       ["A dog.", "a brown dog"])
    # no id: the line number (third line of the file); one caption: a list of one
    assert records[1] == CaptionRecord(3, absolute, ["A cat."])
    base = tmp_path / "base"
    base.mkdir()
    assert load_captions(path, base, limit=1)[0].image == base / "imgs" / "a.jpg"
    one_line = _jsonl(tmp_path / "one.json", [{"image": "a.jpg", "caption": "x"}])
    assert detect_caption_format(one_line) == "jsonl" and len(load_captions(one_line)) == 1


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"line 2 is not valid JSON.*accepted caption formats"),
        ({"caption": "x"}, r"line 2: missing key 'image'"),
        ({"image": "a.jpg"}, r"line 2: needs 'captions' \(list of str\) or 'caption' \(str\)"),
        ({"image": "a.jpg", "captions": []}, r"line 2: 'captions' is empty"),
        ({"image": "a.jpg", "captions": "x"}, r"line 2: 'captions' must be list"),
        ({"image": "a.jpg", "captions": ["x", 2]}, r"line 2: captions\[1\] must be str"),
        ({"image": "a.jpg", "caption": 2}, r"line 2: 'caption' must be str"),
        ({"image": "a.jpg", "caption": "x", "id": 1.5}, r"line 2: 'id' must be int or str"),
        ({"image": "a.jpg", "caption": "x", "id": 1},
         r"image id 1 appears more than once; give all references"),
    ],
)
def test_caption_jsonl_errors_name_the_line(tmp_path: Path, line: object, message: str) -> None:
    path = _jsonl(tmp_path / "captions.jsonl", [{"image": "a.jpg", "caption": "x", "id": 1}, line])
    with pytest.raises(ValueError, match=message):
        load_captions(path)


# --------------------------------------------------------------------------------------------
# Each task refuses the other's files, naming what it accepts
# --------------------------------------------------------------------------------------------


def test_vqa_loader_refuses_caption_files(tmp_path: Path) -> None:
    coco = _coco_captions(tmp_path)
    with pytest.raises(ValueError, match=r"COCO captions JSON: it holds captions, not questions; "
                       r"load it with load_captions \(vlprune eval vqa --task caption\); "
                       r"accepted formats: 'vqav2'.*'gqa'.*'jsonl'"):
        load_vqa(coco)
    lines = _jsonl(tmp_path / "captions.jsonl", [{"image": "a.jpg", "captions": ["x"]}])
    with pytest.raises(ValueError, match=r"line 1 has a caption and no question.*--task caption"
                       r".*accepted formats"):
        load_vqa(lines)
    one_line = _jsonl(tmp_path / "one.json", [{"image": "a.jpg", "caption": "x"}])
    with pytest.raises(ValueError, match=r"caption JSONL: it holds captions"):
        load_vqa(one_line)


def test_caption_loader_refuses_vqa_files(tmp_path: Path) -> None:
    accepted = r"accepted caption formats: 'coco_captions'.*'jsonl'"
    for path in (_vqav2(tmp_path / "v"), _gqa(tmp_path / "g"),
                 tmp_path / "v" / "v2_mscoco_val2014_annotations.json"):
        with pytest.raises(ValueError, match=rf"is a VQA file: it holds questions, not captions; "
                           rf"load it with load_vqa \(vlprune eval vqa --task vqa\); {accepted}"):
            load_captions(path)
    lines = _jsonl(tmp_path / "vqa.jsonl", [{"image": "a.jpg", "question": "q?", "answer": "x"}])
    with pytest.raises(ValueError, match=rf"line 1 has a question and no caption.*--task vqa.*{accepted}"):
        load_captions(lines)
    for name, content in [("list.json", "[1, 2]"), ("obj.json", '{"foo": 1}'), ("text.json", "hi")]:
        path = tmp_path / name
        path.write_text(content)
        with pytest.raises(ValueError, match=accepted):
            load_captions(path)


def test_caption_arguments(tmp_path: Path) -> None:
    path = _coco_captions(tmp_path)
    with pytest.raises(ValueError, match=r"format must be one of \['coco_captions', 'jsonl'\]"):
        load_captions(path, format="vqav2")
    with pytest.raises(ValueError, match="given as format 'coco_captions' but looks like 'jsonl'"):
        load_captions(_jsonl(tmp_path / "c.json", [{"image": "a", "caption": "x"}] * 2),
                      format="coco_captions")
    with pytest.raises(FileNotFoundError, match="caption file not found"):
        load_captions(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        load_captions(path, tmp_path / "no_such_dir")
    with pytest.raises(ValueError, match="limit must be an int >= 0"):
        load_captions(path, limit=-1)
