"""Load a visual question answering set (:class:`VQARecord`) or a captioning set
(:class:`CaptionRecord`).

Questions: three file formats are accepted; :func:`load_vqa` tells them apart (or takes
``format=``):

``"vqav2"``
    The official VQAv2 pair: a questions JSON
    (``{"questions": [{"image_id", "question", "question_id"}, ...]}``) given as ``path``, and
    its annotations JSON (``{"annotations": [{"question_id", "image_id", "answers":
    [{"answer": ...}, ...], ...}]}``) given as ``annotations=``, or found next to the
    questions file (the only ``*annotations*.json`` there, or the only one whose name holds
    the questions file's ``data_subtype`` such as ``val2014``). Images follow COCO names:
    ``COCO_<split>_<12-digit image id>.jpg`` (2014) or ``<12-digit image id>.jpg`` (2017); the
    naming is read from the files present in the image folder, or given as ``image_pattern``
    (a ``str.format`` pattern with an ``image_id`` field, e.g.
    ``"COCO_val2014_{image_id:012d}.jpg"``). The image folder defaults to
    ``<questions folder>/<data_subtype>`` when that exists, else the questions folder.
``"gqa"``
    A GQA-style JSON object ``{question_id: {"imageId": ..., "question": ..., "answer": ...}}``
    with images ``<imageId>.jpg`` (or ``image_pattern``, field ``image_id``) in ``images``,
    by default ``<json folder>/images`` when that exists, else the JSON's folder. Each record
    has the one answer.
``"jsonl"``
    One JSON object per line: ``image`` (a path, absolute or relative to ``images`` when given,
    else to the JSONL file's folder), ``question``, ``answers`` (a list of str) or ``answer``
    (a str), and optionally ``question_id`` (default: the 1-based line number). Blank lines
    are skipped.

Captions: two file formats are accepted; :func:`load_captions` tells them apart (or takes
``format=``):

``"coco_captions"``
    The COCO captions JSON (``captions_val2014.json``, Karpathy-split files in the same
    layout): ``{"images": [{"id", "file_name"}, ...], "annotations": [{"image_id",
    "caption"}, ...]}``. One record per entry of ``images`` (in that order) with every caption
    annotated for it (in the order of ``annotations``). Images are ``<images>/<file_name>``;
    the folder defaults to ``<json folder>/<split>`` or ``<json folder>/../<split>`` when the
    file is named ``captions_<split>.json`` and that folder exists, else the JSON's folder.
``"jsonl"``
    One JSON object per line: ``image`` (a path, absolute or relative to ``images`` when given,
    else to the JSONL file's folder), ``captions`` (a non-empty list of str) or ``caption`` (a
    str), and optionally ``id`` (default: the 1-based line number). Blank lines are skipped.

Each loader refuses the other task's files with an error that says so. Records keep the
file's order; ``limit`` keeps the first ``limit`` of them. Image files are not opened here:
:func:`missing_images` lists the records whose image does not exist, so a caller can skip and
count them, or stop.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "CAPTION_FORMATS",
    "CaptionRecord",
    "Record",
    "VQARecord",
    "VQA_FORMATS",
    "detect_caption_format",
    "detect_format",
    "load_captions",
    "load_vqa",
    "missing_images",
]

#: Accepted values of ``format`` in :func:`load_vqa`.
VQA_FORMATS = ("vqav2", "gqa", "jsonl")

#: Accepted values of ``format`` in :func:`load_captions`.
CAPTION_FORMATS = ("coco_captions", "jsonl")

_ACCEPTED = (
    "accepted formats: 'vqav2' (questions JSON {\"questions\": [...]} with its annotations "
    "JSON {\"annotations\": [...]}), 'gqa' (JSON {question_id: {\"imageId\", \"question\", "
    "\"answer\"}}), 'jsonl' (one JSON object per line with \"image\", \"question\" and "
    "\"answers\" (list of str) or \"answer\" (str), optional \"question_id\")"
)

_CAPTION_ACCEPTED = (
    "accepted caption formats: 'coco_captions' (COCO captions JSON {\"images\": [{\"id\", "
    "\"file_name\"}], \"annotations\": [{\"image_id\", \"caption\"}]}), 'jsonl' (one JSON "
    "object per line with \"image\" and \"captions\" (list of str) or \"caption\" (str), "
    "optional \"id\")"
)

# What the two tasks call each other's files, in the errors that refuse them.
_IS_CAPTIONS = ("holds captions, not questions; load it with load_captions "
                "(vlprune eval vqa --task caption)")
_IS_QUESTIONS = ("holds questions, not captions; load it with load_vqa "
                 "(vlprune eval vqa --task vqa)")

# COCO image names: COCO_<split>_<12 digits>.<ext> (2014) or <12 digits>.<ext> (2017).
_COCO_NAME = re.compile(r"^(COCO_[A-Za-z0-9]+_)?(\d{12})\.(jpg|jpeg|png)$", re.IGNORECASE)


@dataclass
class VQARecord:
    """One question: its id, the path of its image, the question, the ground-truth answers.

    ``question_id`` keeps the type it has in the file (int for VQAv2, str for GQA, either for
    JSONL). ``answers`` holds every annotator's answer (10 for VQAv2) or the single answer.
    """

    question_id: int | str
    image: Path
    question: str
    answers: list[str] = field(default_factory=list)


@dataclass
class CaptionRecord:
    """One image to caption: its id, the path of the image, its reference captions.

    ``image_id`` keeps the type it has in the file (int for COCO, int or str for JSONL).
    ``captions`` holds every reference caption (5 or more for COCO), in the file's order.
    """

    image_id: int | str
    image: Path
    captions: list[str] = field(default_factory=list)


#: a record of either task
Record = VQARecord | CaptionRecord


def missing_images(records: Iterable[Record]) -> list[Record]:
    """The records whose image file does not exist (in their original order)."""
    return [r for r in records if not Path(r.image).is_file()]


def detect_format(path: str | os.PathLike) -> str:
    """Which of :data:`VQA_FORMATS` the file at ``path`` is in (reads the file)."""
    path = _existing_file(path, "VQA file")
    fmt, _ = _read_any(path)
    return fmt


def load_vqa(path: str | os.PathLike, images: str | os.PathLike | None = None, *,
             annotations: str | os.PathLike | None = None, format: str | None = None,
             image_pattern: str | None = None, limit: int | None = None) -> list[VQARecord]:
    """Load a VQA set from ``path`` into a list of :class:`VQARecord`.

    Args:
        path: the VQAv2 questions JSON, the GQA-style JSON, or the JSONL file.
        images: the image folder (VQAv2, GQA) or the base of relative image paths (JSONL);
            defaults are described in the module docstring.
        annotations: the VQAv2 annotations JSON (other formats: must be None).
        format: one of :data:`VQA_FORMATS`, or None to detect it from the file.
        image_pattern: VQAv2 / GQA image file name as a ``str.format`` pattern with an
            ``image_id`` field; default: COCO naming read from the folder (VQAv2),
            ``"{image_id}.jpg"`` (GQA).
        limit: keep only the first ``limit`` records (None: all).

    Raises:
        FileNotFoundError: a file or folder given or needed does not exist.
        ValueError: the file is in none of the accepted formats, a record lacks a field or
            has one of the wrong type (the message names the line or key), question ids
            repeat, or an argument is out of range.
    """
    path, images, fmt, data = _open_set(path, "VQA file", VQA_FORMATS, format, limit, images,
                                        _read_any)
    if fmt != "vqav2" and annotations is not None:
        raise ValueError(f"annotations= is only for the 'vqav2' format; {path} is {fmt!r}")
    if fmt == "jsonl" and image_pattern is not None:
        raise ValueError("image_pattern is only for the 'vqav2' and 'gqa' formats; JSONL "
                         "records name their image")

    if fmt == "vqav2":
        records = _load_vqav2(path, data, images, annotations, image_pattern, limit)
    elif fmt == "gqa":
        records = _load_gqa(path, data, images, image_pattern, limit)
    else:
        records = _load_jsonl(path, images, limit)
    _check_unique_ids(records, path)
    return records


# ---------------------------------------------------------------------------------------------
# Reading and detection
# ---------------------------------------------------------------------------------------------

def _existing_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); {_ACCEPTED}") from e


def _open_set(path: str | os.PathLike, what: str, formats: Sequence[str], format: str | None,
              limit: int | None, images: str | os.PathLike | None,
              read: Callable[[Path], tuple[str, Any]]) -> tuple[Path, Path | None, str, Any]:
    """Check a loader's arguments and detect the file's format (``format`` given: checked
    against what the file looks like). Returns ``(path, images, format, parsed data)``."""
    path = _existing_file(path, what)
    if format is not None and format not in formats:
        raise ValueError(f"format must be one of {list(formats)} or None, got {format!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be an int >= 0 or None, got {limit!r}")
    if images is not None:
        images = Path(images)
        if not images.is_dir():
            raise FileNotFoundError(f"image folder not found: {images}")
    if format == "jsonl":
        return path, images, "jsonl", path
    fmt, data = read(path)
    if format is not None and fmt != format:
        raise ValueError(f"{path} was given as format {format!r} but looks like {fmt!r}")
    return path, images, fmt, data


def _json_or_jsonl(path: Path, accepted: str) -> tuple[str, Any]:
    """``("jsonl", path)`` for a JSONL file (by suffix, or one JSON object a line), else
    ``("json", parsed data)``; neither: a ValueError naming the ``accepted`` formats."""
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return "jsonl", path
    text = path.read_text(encoding="utf-8")
    try:
        return "json", json.loads(text)
    except json.JSONDecodeError as e:
        first = next((line for line in text.splitlines() if line.strip()), "")
        try:
            is_object = isinstance(json.loads(first), dict)
        except json.JSONDecodeError:
            is_object = False
        if is_object:  # several JSON objects, one a line: JSONL under another name
            return "jsonl", path
        raise ValueError(f"{path} is neither JSON nor JSONL ({e}); {accepted}") from e


def _read_any(path: Path) -> tuple[str, Any]:
    """Detect the format; returns it with the parsed JSON (or the path, for JSONL)."""
    kind, data = _json_or_jsonl(path, _ACCEPTED)
    if kind == "jsonl":
        return kind, data
    if isinstance(data, dict):
        if "questions" in data:
            return "vqav2", data
        if _looks_like_coco_captions(data):
            raise ValueError(f"{path} is a COCO captions JSON: it {_IS_CAPTIONS}; {_ACCEPTED}")
        if "annotations" in data:
            raise ValueError(
                f"{path} is a VQAv2 annotations file; pass the questions JSON as the path "
                f"and this file as annotations="
            )
        values = data.values()
        if (data and all(isinstance(v, dict) for v in values)
                and any("imageId" in v for v in values)):
            return "gqa", data  # entries lacking a field are reported by key when loading
        if isinstance(data.get("image"), str) and "question" in data:  # a one-line JSONL
            return "jsonl", path
        if isinstance(data.get("image"), str) and _has_caption(data):
            raise ValueError(f"{path} is a caption JSONL: it {_IS_CAPTIONS}; {_ACCEPTED}")
    raise ValueError(f"{path}: unrecognised VQA file; {_ACCEPTED}")


def _has_caption(entry: dict) -> bool:
    return "caption" in entry or "captions" in entry


def _looks_like_coco_captions(data: dict) -> bool:
    """A COCO captions JSON: an ``images`` list, or annotations that hold captions."""
    anns = data.get("annotations")
    if not isinstance(anns, list):
        return False
    if isinstance(data.get("images"), list):
        return True
    return bool(anns) and isinstance(anns[0], dict) and "caption" in anns[0]


def _check_unique_ids(records: list[VQARecord], path: Path) -> None:
    seen: set[int | str] = set()
    for r in records:
        if r.question_id in seen:
            raise ValueError(f"{path}: question_id {r.question_id!r} appears more than once")
        seen.add(r.question_id)


def _need(entry: Any, key: str, types: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    if key not in entry:
        raise ValueError(f"{where}: missing key {key!r} (keys present: {sorted(entry)})")
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, types):
        names = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
        raise ValueError(f"{where}: {key!r} must be {names}, got {value!r}")
    return value


def _format_name(pattern: str, image_id: int | str) -> str:
    try:
        return pattern.format(image_id=image_id)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(
            f"image_pattern {pattern!r} does not format with image_id={image_id!r} ({e}); "
            "it must use the one field {image_id}, e.g. 'COCO_val2014_{image_id:012d}.jpg'"
        ) from e


# ---------------------------------------------------------------------------------------------
# VQAv2
# ---------------------------------------------------------------------------------------------

def _find_annotations(qpath: Path, subtype: str | None) -> Path:
    candidates = sorted(p for p in qpath.parent.glob("*.json")
                        if "annotations" in p.name and p != qpath)
    if subtype:
        matching = [p for p in candidates if subtype in p.name]
        if matching:
            candidates = matching
    if len(candidates) == 1:
        return candidates[0]
    found = ", ".join(p.name for p in candidates) if candidates else "none"
    raise FileNotFoundError(
        f"cannot tell which annotations JSON goes with {qpath} (found next to it: {found}); "
        "pass annotations=<path to the VQAv2 annotations JSON>"
    )


def _coco_pattern(folder: Path, subtype: str | None) -> str:
    kinds: dict[tuple[str, str], int] = {}
    with os.scandir(folder) as it:
        for entry in it:
            m = _COCO_NAME.match(entry.name)
            if m:
                key = (m.group(1) or "", m.group(3))
                kinds[key] = kinds.get(key, 0) + 1
    example = f"'COCO_{subtype or 'val2014'}_{{image_id:012d}}.jpg'"
    if not kinds:
        raise ValueError(
            f"no COCO-named image (COCO_<split>_<12-digit id>.jpg or <12-digit id>.jpg) in "
            f"{folder}; pass images=<the image folder> or image_pattern=, e.g. {example}"
        )
    keys = list(kinds)
    if subtype and len(keys) > 1:
        keys = [k for k in keys if k[0] in ("", f"COCO_{subtype}_")]
    if len(keys) != 1:
        found = ", ".join(f"{p or ''}<id>.{e} ({n})" for (p, e), n in kinds.items())
        raise ValueError(
            f"{folder} holds images named in several ways: {found}; pass image_pattern=, "
            f"e.g. {example}"
        )
    prefix, ext = keys[0]
    if subtype and prefix and prefix != f"COCO_{subtype}_":
        raise ValueError(
            f"the questions are for {subtype} but the images in {folder} are named "
            f"{prefix}<id>.{ext}; pass the {subtype} image folder as images=, or image_pattern="
        )
    return prefix + "{image_id:012d}." + ext


def _load_vqav2(qpath: Path, qdata: dict, images: Path | None,
                annotations: str | os.PathLike | None, image_pattern: str | None,
                limit: int | None) -> list[VQARecord]:
    questions = qdata["questions"]
    if not isinstance(questions, list):
        raise ValueError(f"{qpath}: 'questions' must be a list, got {type(questions).__name__}")
    subtype = qdata.get("data_subtype") if isinstance(qdata.get("data_subtype"), str) else None
    apath = (_existing_file(annotations, "annotations file") if annotations is not None
             else _find_annotations(qpath, subtype))
    adata = _read_json(apath)
    if not isinstance(adata, dict) or not isinstance(adata.get("annotations"), list):
        raise ValueError(f"{apath} is not a VQAv2 annotations file (a JSON object with an "
                         f"'annotations' list); {_ACCEPTED}")
    by_qid: dict[int | str, dict] = {}
    for i, ann in enumerate(adata["annotations"]):
        qid = _need(ann, "question_id", (int, str), f"{apath} annotations[{i}]")
        by_qid[qid] = ann

    if images is None:
        images = qpath.parent / subtype if subtype and (qpath.parent / subtype).is_dir() \
            else qpath.parent
    pattern = image_pattern if image_pattern is not None else _coco_pattern(images, subtype)

    if limit is not None:
        questions = questions[:limit]
    records = []
    for i, q in enumerate(questions):
        where = f"{qpath} questions[{i}]"
        qid = _need(q, "question_id", (int, str), where)
        where = f"{where} (question_id {qid!r})"
        image_id = _need(q, "image_id", (int, str), where)
        question = _need(q, "question", str, where)
        ann = by_qid.get(qid)
        if ann is None:
            raise ValueError(f"{where} has no annotation in {apath}")
        awhere = f"{apath} annotation of question_id {qid!r}"
        if "image_id" in ann and ann["image_id"] != image_id:
            raise ValueError(f"{awhere}: image_id {ann['image_id']!r} differs from the "
                             f"question's {image_id!r}")
        answers = _need(ann, "answers", list, awhere)
        if not answers:
            raise ValueError(f"{awhere}: 'answers' is empty")
        texts = [_need(a, "answer", str, f"{awhere} answers[{j}]")
                 for j, a in enumerate(answers)]
        records.append(VQARecord(qid, images / _format_name(pattern, image_id), question, texts))
    return records


# ---------------------------------------------------------------------------------------------
# GQA
# ---------------------------------------------------------------------------------------------

def _load_gqa(path: Path, data: dict, images: Path | None, image_pattern: str | None,
              limit: int | None) -> list[VQARecord]:
    if images is None:
        images = path.parent / "images" if (path.parent / "images").is_dir() else path.parent
    pattern = image_pattern if image_pattern is not None else "{image_id}.jpg"
    records = []
    for qid, entry in data.items():
        if limit is not None and len(records) >= limit:
            break
        where = f"{path} key {qid!r}"
        image_id = _need(entry, "imageId", (str, int), where)
        question = _need(entry, "question", str, where)
        answer = _need(entry, "answer", str, where)
        records.append(VQARecord(qid, images / _format_name(pattern, image_id), question,
                                 [answer]))
    return records


# ---------------------------------------------------------------------------------------------
# JSONL
# ---------------------------------------------------------------------------------------------

def _jsonl_entries(path: Path, images: Path | None, limit: int | None, *, captions: bool
                   ) -> Iterator[tuple[int, str, dict, Path]]:
    """``(line number, where, object, image path)`` for every non-blank line of a question
    (``captions=False``) or caption JSONL file, at most ``limit`` of them (checked before a
    line is parsed; the caller makes one record of every entry, or raises). Raises a
    ValueError naming the line when it is not JSON, lacks ``image`` or holds the other kind
    of record. Relative image paths are under ``images`` (default: the file's folder)."""
    accepted = _CAPTION_ACCEPTED if captions else _ACCEPTED
    base = images if images is not None else path.parent
    n = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if limit is not None and n >= limit:
                break
            if not line.strip():
                continue
            where = f"{path} line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where} is not valid JSON ({e}); {accepted}") from e
            image = _need(obj, "image", str, where)
            has_question, has_caption = "question" in obj, _has_caption(obj)
            if captions and has_question and not has_caption:
                raise ValueError(f"{where} has a question and no caption: the file "
                                 f"{_IS_QUESTIONS}; {accepted}")
            if not captions and has_caption and not has_question:
                raise ValueError(f"{where} has a caption and no question: the file "
                                 f"{_IS_CAPTIONS}; {accepted}")
            n += 1
            yield lineno, where, obj, base / image


def _strings(obj: dict, many: str, one: str, where: str) -> list[str]:
    """The non-empty list of str under key ``many``, or the one str under ``one``, as a list;
    neither key: a ValueError naming both."""
    if many in obj:
        values = _need(obj, many, list, where)
        if not values:
            raise ValueError(f"{where}: {many!r} is empty")
        for j, v in enumerate(values):
            if not isinstance(v, str):
                raise ValueError(f"{where}: {many}[{j}] must be str, got {v!r}")
        return list(values)
    if one in obj:
        return [_need(obj, one, str, where)]
    raise ValueError(f"{where}: needs {many!r} (list of str) or {one!r} (str); "
                     f"keys present: {sorted(obj)}")


def _load_jsonl(path: Path, images: Path | None, limit: int | None) -> list[VQARecord]:
    records = []
    for lineno, where, obj, image in _jsonl_entries(path, images, limit, captions=False):
        question = _need(obj, "question", str, where)
        answers = _strings(obj, "answers", "answer", where)
        qid = _need(obj, "question_id", (int, str), where) if "question_id" in obj else lineno
        records.append(VQARecord(qid, image, question, answers))
    return records


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------

# COCO captions files are named captions_<split>.json (captions_val2014.json, ...).
_COCO_CAPTIONS_NAME = re.compile(r"captions_([A-Za-z]+\d*)$")


def detect_caption_format(path: str | os.PathLike) -> str:
    """Which of :data:`CAPTION_FORMATS` the file at ``path`` is in (reads the file)."""
    path = _existing_file(path, "caption file")
    fmt, _ = _read_captions_any(path)
    return fmt


def load_captions(path: str | os.PathLike, images: str | os.PathLike | None = None, *,
                  format: str | None = None, limit: int | None = None) -> list[CaptionRecord]:
    """Load a captioning set from ``path`` into a list of :class:`CaptionRecord`.

    Args:
        path: the COCO captions JSON or the JSONL file.
        images: the image folder (COCO: holds the ``file_name`` of every image) or the base
            of relative image paths (JSONL); defaults are described in the module docstring.
        format: one of :data:`CAPTION_FORMATS`, or None to detect it from the file.
        limit: keep only the first ``limit`` images (None: all).

    Raises:
        FileNotFoundError: the file or the image folder does not exist.
        ValueError: the file is in none of the accepted formats (a VQA file is named as such),
            a record lacks a field or has one of the wrong type (the message names the line
            or entry), an image has no caption, an annotation names an unknown image, image
            ids repeat, or an argument is out of range.
    """
    path, images, fmt, data = _open_set(path, "caption file", CAPTION_FORMATS, format, limit,
                                        images, _read_captions_any)
    if fmt == "coco_captions":
        records = _load_coco_captions(path, data, images, limit)
    else:
        records = _load_caption_jsonl(path, images, limit)
    seen: set[int | str] = set()
    for r in records:
        if r.image_id in seen:
            raise ValueError(f"{path}: image id {r.image_id!r} appears more than once; give all "
                             "references of an image on one record (\"captions\": [...])")
        seen.add(r.image_id)
    return records


def _read_captions_any(path: Path) -> tuple[str, Any]:
    """Detect the caption format; returns it with the parsed JSON (or the path, for JSONL)."""
    kind, data = _json_or_jsonl(path, _CAPTION_ACCEPTED)
    if kind == "jsonl":
        return kind, data
    if isinstance(data, dict):
        if _looks_like_coco_captions(data):
            return "coco_captions", data
        if isinstance(data.get("image"), str) and _has_caption(data):  # a one-line JSONL
            return "jsonl", path
        values = data.values()
        if ("questions" in data or "annotations" in data or "question" in data
                or (data and all(isinstance(v, dict) for v in values)
                    and any("imageId" in v for v in values))):
            raise ValueError(f"{path} is a VQA file: it {_IS_QUESTIONS}; {_CAPTION_ACCEPTED}")
    raise ValueError(f"{path}: unrecognised caption file; {_CAPTION_ACCEPTED}")


def _coco_caption_folder(path: Path) -> Path:
    m = _COCO_CAPTIONS_NAME.search(path.stem)
    if m:
        for folder in (path.parent / m.group(1), path.parent.parent / m.group(1)):
            if folder.is_dir():
                return folder
    return path.parent


def _load_coco_captions(path: Path, data: dict, images: Path | None,
                        limit: int | None) -> list[CaptionRecord]:
    entries, anns = data.get("images"), data["annotations"]
    if not isinstance(entries, list):
        raise ValueError(f"{path}: a COCO captions JSON needs an 'images' list ([{{\"id\", "
                         f"\"file_name\"}}, ...]) next to 'annotations'; {_CAPTION_ACCEPTED}")
    folder = images if images is not None else _coco_caption_folder(path)
    names: dict[int | str, str] = {}
    for i, entry in enumerate(entries):
        where = f"{path} images[{i}]"
        image_id = _need(entry, "id", (int, str), where)
        if image_id in names:
            raise ValueError(f"{where}: image id {image_id!r} appears more than once")
        names[image_id] = _need(entry, "file_name", str, f"{where} (id {image_id!r})")
    captions: dict[int | str, list[str]] = {image_id: [] for image_id in names}
    for j, ann in enumerate(anns):
        where = f"{path} annotations[{j}]"
        image_id = _need(ann, "image_id", (int, str), where)
        caption = _need(ann, "caption", str, f"{where} (image_id {image_id!r})")
        if image_id not in captions:
            raise ValueError(f"{where}: image_id {image_id!r} is not in 'images'")
        captions[image_id].append(caption)
    kept = list(names.items())
    if limit is not None:
        kept = kept[:limit]
    records = []
    for image_id, name in kept:
        if not captions[image_id]:
            raise ValueError(f"{path}: image {image_id!r} ({name}) has no caption in "
                             "'annotations'")
        records.append(CaptionRecord(image_id, folder / name, captions[image_id]))
    return records


def _load_caption_jsonl(path: Path, images: Path | None, limit: int | None
                        ) -> list[CaptionRecord]:
    records = []
    for lineno, where, obj, image in _jsonl_entries(path, images, limit, captions=True):
        captions = _strings(obj, "captions", "caption", where)
        image_id = _need(obj, "id", (int, str), where) if "id" in obj else lineno
        records.append(CaptionRecord(image_id, image, captions))
    return records
