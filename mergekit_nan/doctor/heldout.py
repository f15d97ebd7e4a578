"""Held-out data files for ``mergekit-nan compare``, read and checked before any merge.

One file is a list of documents:

* ``.txt``: one document per non-empty line;
* ``.jsonl``: one document per non-empty line, a JSON object with a ``text``
  string or a chat ``messages`` list (of objects with ``role`` and
  ``content``), which the tokenizer's chat template renders later;
* ``.parquet``, ``.csv`` or a directory saved by ``datasets``
  (``Dataset.save_to_disk``): a ``text`` column of strings, read through
  ``datasets`` (any cache it builds lives in a temporary directory, deleted
  afterwards).

Every mistake is a :class:`DataError` whose one-line message names the file
and, for a record, its number (1-based line of a ``.jsonl``, row of a table).
``max_documents`` keeps a seeded sample of that many documents, in file order.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

__all__ = ["DATA_SUFFIXES", "DataError", "Document", "check_distinct", "load_documents"]

DATA_SUFFIXES = (".txt", ".jsonl", ".parquet", ".csv")
"""The file types a data file may have (or be a saved ``datasets`` directory)."""


class DataError(ValueError):
    """A held-out data file that cannot be read as documents."""


@dataclass(frozen=True)
class Document:
    """One held-out document: plain ``text``, or chat ``messages`` to render."""

    text: Optional[str] = None
    messages: Optional[Tuple[Any, ...]] = None


def _text_lines(path: str) -> List[Document]:
    with open(path, encoding="utf-8") as file:
        return [Document(text=line.rstrip("\n")) for line in file if line.strip()]


def _messages(value: Any, where: str) -> Tuple[Any, ...]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: 'messages' must be a non-empty list of messages")
    for number, message in enumerate(value, start=1):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise DataError(
                f"{where}: message {number} needs a 'role' and a 'content' string; got {message!r:.80}"
            )
    return tuple(value)


def _json_lines(path: str) -> List[Document]:
    documents = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            where = f"{path} record {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where} is not JSON: {error.msg}") from None
            if not isinstance(record, dict):
                raise DataError(f"{where} is not a JSON object with 'text' or 'messages'")
            if isinstance(record.get("text"), str):
                documents.append(Document(text=record["text"]))
            elif "messages" in record:
                documents.append(Document(messages=_messages(record["messages"], where)))
            else:
                keys = ", ".join(sorted(record)) or "none"
                raise DataError(
                    f"{where} has no 'text' string or 'messages' list (its keys: {keys})"
                )
    return documents


def _table(path: str) -> List[Document]:
    import datasets

    with tempfile.TemporaryDirectory(prefix="mergekit-nan-data-") as cache:
        if os.path.isdir(path):
            try:
                table = datasets.load_from_disk(path, keep_in_memory=True)
            except FileNotFoundError:
                raise DataError(
                    f"{path} is a directory but no dataset saved by datasets' save_to_disk"
                ) from None
            if isinstance(table, datasets.DatasetDict):
                raise DataError(
                    f"{path} holds several splits ({', '.join(table)}); give one split's directory"
                )
        else:
            reader = datasets.Dataset.from_parquet if path.endswith(".parquet") else None
            reader = reader or datasets.Dataset.from_csv
            table = reader(path, cache_dir=cache, keep_in_memory=True)
        if "text" not in table.column_names:
            columns = ", ".join(table.column_names) or "none"
            raise DataError(f"{path} has no 'text' column (its columns: {columns})")
        texts = table["text"]
        texts = list(texts) if not isinstance(texts, list) else texts
    documents = []
    for number, text in enumerate(texts, start=1):
        if text is None:
            continue
        if not isinstance(text, str):
            raise DataError(f"{path} row {number}: 'text' is not a string ({type(text).__name__})")
        documents.append(Document(text=text))
    return documents


def _read(path: str) -> List[Document]:
    if os.path.isdir(path):
        return _table(path)
    suffix = Path(path).suffix.lower()
    if suffix == ".txt":
        return _text_lines(path)
    if suffix == ".jsonl":
        return _json_lines(path)
    if suffix in (".parquet", ".csv"):
        return _table(path)
    raise DataError(
        f"{path}: unknown data file type {suffix or '(none)'!r}; use "
        f"{', '.join(DATA_SUFFIXES)} or a directory saved by datasets"
    )


def load_documents(
    path: str, *, max_documents: Optional[int] = None, seed: int = 0
) -> List[Document]:
    """The documents of the data file at ``path`` (a :class:`DataError` if there are none).

    With ``max_documents``, a sample of that many drawn with ``seed`` (the
    file's documents in their order, the others left out).
    """
    if not os.path.exists(path):
        raise DataError(f"data file {path} not found")
    try:
        documents = _read(path)
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path} is not UTF-8 text ({error.reason} at byte {error.start})"
        ) from None
    if not documents:
        raise DataError(f"data file {path} holds no document")
    if max_documents is not None and max_documents < len(documents):
        keep = sorted(random.Random(seed).sample(range(len(documents)), max_documents))
        documents = [documents[index] for index in keep]
    return documents


def check_distinct(paths: Sequence[str]) -> None:
    """Refuse a data file named twice (its documents would count twice overall)."""
    seen = {}
    for path in paths:
        real = os.path.realpath(path)
        if real in seen:
            raise DataError(f"data file {path} is given twice (also as {seen[real]})")
        seen[real] = path
