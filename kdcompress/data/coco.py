"""COCO-format detection JSON helpers (the digits set writes per-digit boxes this way)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any, Sequence

from kdcompress.engine.checkpoint import atomic_write_text
from kdcompress.errors import DataError


def write_coco_json(path: str | Path, images: Sequence[dict[str, Any]], annotations: Sequence[dict[str, Any]],
                    categories: Sequence[dict[str, Any]]) -> Path:
    """Write a COCO detection file atomically (temp file + rename) so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"images": list(images), "annotations": list(annotations), "categories": list(categories)}
    atomic_write_text(path, json.dumps(doc, separators=(",", ":")))
    return path


def load_coco(path: str | Path):
    """Load and sanity-check a COCO detection file; returns a ``pycocotools.coco.COCO``."""
    from pycocotools.coco import COCO

    path = Path(path)
    if not path.is_file():
        raise DataError(f"COCO annotation file '{path}' is missing; regenerate the dataset or fix the path")
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"COCO annotation file '{path}' is not valid JSON ({err}); regenerate it") from None
    keys = ("images", "annotations", "categories")
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list) for k in keys):
        raise DataError(f"COCO annotation file '{path}' lacks 'images'/'annotations'/'categories' lists; "
                        f"expected COCO detection format")
    try:
        image_ids = {im["id"] for im in doc["images"]}
        cat_ids = {c["id"] for c in doc["categories"]}
        for ann in doc["annotations"]:
            if ann["image_id"] not in image_ids or ann["category_id"] not in cat_ids or len(ann["bbox"]) != 4:
                raise DataError(f"COCO annotation {ann.get('id')} in '{path}' refers to an unknown image/category "
                                f"or has a malformed bbox; regenerate the file")
    except (KeyError, TypeError) as err:
        raise DataError(f"COCO annotation file '{path}' has an entry without {err}; expected COCO detection format") \
            from None
    coco = COCO()
    coco.dataset = doc
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    return coco
