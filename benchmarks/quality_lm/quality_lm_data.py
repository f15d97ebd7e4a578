"""Corpora of the language-model quality benchmark: real text read from the local disk.

Every corpus is human-written text that a Python installation (and a Debian
system) already has on disk; nothing is downloaded.

* pool ``python`` (pre-training only): the Python standard library's ``*.py``
  source (``sysconfig.get_paths()["stdlib"]``, without ``site-packages``,
  ``test``/``tests``, ``idlelib``, and the generated tables and data of
  ``encodings``, ``pydoc_data`` and ``lib2to3``).
* expert domain ``c-headers``: C header files, Python's own include directory
  first (``sysconfig`` ``include``/``platinclude``), then ``/usr/include``.
* expert domain ``licences``: licence files of the installed distributions
  (``LICENSE*``, ``LICENCE*``, ``COPYING*``, ``NOTICE*`` in ``*.dist-info``),
  then ``/usr/share/common-licenses``, then Debian's ``/usr/share/doc/*/copyright``.
* expert domain ``package-docs`` (English prose): the long descriptions of the
  installed distributions (the body of each ``*.dist-info/METADATA``, i.e. the
  README), then ``*.md``/``*.rst`` files in the site-packages directories.

Why these: every Python installation has them (the README and licence domains
grow with the installed packages; this benchmark's own dependencies, torch,
transformers and mergekit among them, bring plenty), they are written by
people, and they differ from the pool and from each other: C code, legal
English, Markdown/ReST prose. The pool is Python code, so the base has seen
only comments and docstrings of English and other-language code before the
experts see C; its loss on the three domains is far above its loss on
held-out pool text, and each expert gains a lot on its own domain.

Contract of the splits (deterministic, independent of file-system order):

* candidate files are listed per source and sorted; each gets a key that does
  not depend on where the installation lives (``stdlib/json/decoder.py``,
  ``dist/torch/METADATA``: distribution names without their version);
* a file's split (``train``/``val``/``test``) is a stable hash of its key; files
  are visited source by source (a later source is a fallback, read only while a
  split is not full yet) and, within a source, in the order of a second hash of
  the key, so a capped split is a pseudo-random sample of the files;
* a document is the start of a file's text (``\\r\\n`` -> ``\\n``), at most
  ``doc_bytes`` long (16 KB for the pool, 4 KB for headers and licences, 8 KB
  for the READMEs, which are fewer); held-out documents are cut at
  ``eval_doc_bytes`` (2 KB) so that held-out text spans more files; files under
  200 bytes, not UTF-8, or with NUL bytes are skipped;
* duplicates are dropped across all corpora by a fingerprint of the text
  (lower-cased, digits and lines mentioning "copyright" removed, whitespace
  collapsed), so the same licence cannot sit in two splits or two corpora;
* reading stops when every split holds its cap of bytes; a split that stays
  under its cap raises :class:`CorpusError` naming the sources and their sizes.

Tokens are bytes (0-255) plus :data:`SEPARATOR` between documents.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import site
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

SEPARATOR = 256
"""Token id that ends every document."""
VOCAB_SIZE = 257
SPLITS: Tuple[str, ...] = ("train", "val", "test")
MIN_DOC_BYTES = 200


class CorpusError(RuntimeError):
    """A corpus is missing or too small on this machine."""


@dataclass(frozen=True)
class Source:
    """A set of files: how to list them (sorted, with keys) and read one."""

    name: str
    files: Callable[[], List[Tuple[str, Path]]]
    read: Callable[[bytes], bytes] = lambda raw: raw


@dataclass(frozen=True)
class Corpus:
    """A named corpus, its sources (in fallback order) and its per-document caps."""

    name: str
    description: str
    sources: Tuple[Source, ...]
    doc_bytes: int
    eval_doc_bytes: int
    val_fraction: float = 0.15
    test_fraction: float = 0.15


@dataclass
class Documents:
    """The documents of one corpus per split, in key order, and where they came from."""

    corpus: str
    splits: Dict[str, List[bytes]]
    keys: Dict[str, List[str]]
    sources_used: List[str] = field(default_factory=list)

    def size(self, split: str) -> int:
        return sum(len(d) for d in self.splits[split])


def _walk(root: Path, keep: Callable[[Path], bool], prune: Sequence[str] = ()) -> List[Path]:
    """Files under ``root`` (sorted, symlinks to directories not followed)."""
    found: List[Path] = []
    if not root.is_dir():
        return found
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in prune and d != "__pycache__")
        for name in sorted(files):
            path = Path(directory) / name
            if path.is_file() and keep(path):
                found.append(path)
    return sorted(found)


def _keyed(prefix: str, root: Path, paths: Sequence[Path]) -> List[Tuple[str, Path]]:
    return sorted((f"{prefix}/{p.relative_to(root).as_posix()}", p) for p in paths)


def _stdlib_python() -> List[Tuple[str, Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    prune = ("site-packages", "dist-packages", "test", "tests", "idlelib")
    prune += ("idle_test", "encodings", "pydoc_data", "lib2to3")
    return _keyed("stdlib", root, _walk(root, lambda p: p.suffix == ".py", prune))


def _python_headers() -> List[Tuple[str, Path]]:
    paths = sysconfig.get_paths()
    roots = sorted({paths["include"], paths.get("platinclude", paths["include"])})
    found: Dict[str, Path] = {}
    for root in map(Path, roots):
        for key, path in _keyed("python-include", root, _walk(root, lambda p: p.suffix == ".h")):
            found.setdefault(key, path)
    return sorted(found.items())


def _system_headers() -> List[Tuple[str, Path]]:
    root = Path("/usr/include")
    return _keyed("usr-include", root, _walk(root, lambda p: p.suffix == ".h"))


def site_directories() -> List[Path]:
    """The site-packages directories of this interpreter (sorted, existing)."""
    paths = set(site.getsitepackages()) | {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    return sorted(Path(p) for p in paths if Path(p).is_dir())


def _distribution(dist_info: Path) -> str:
    """``torch-2.13.0+cpu.dist-info`` -> ``torch`` (keys survive version upgrades)."""
    return dist_info.name[: -len(".dist-info")].split("-")[0].lower().replace("_", "-")


def _dist_info_files(match: Callable[[Path], bool]) -> List[Tuple[str, Path]]:
    found: Dict[str, Path] = {}
    for directory in site_directories():
        for dist_info in sorted(directory.glob("*.dist-info")):
            prefix = f"dist/{_distribution(dist_info)}"
            for key, path in _keyed(prefix, dist_info, _walk(dist_info, match)):
                found.setdefault(key, path)
    return sorted(found.items())


_LICENCE_NAME = re.compile(r"^(LICEN[CS]E|COPYING|NOTICE)", re.IGNORECASE)


def _dist_licences() -> List[Tuple[str, Path]]:
    return _dist_info_files(lambda p: bool(_LICENCE_NAME.match(p.name)))


def _common_licences() -> List[Tuple[str, Path]]:
    root = Path("/usr/share/common-licenses")
    return _keyed("common-licenses", root, _walk(root, lambda p: True))


def _debian_copyright() -> List[Tuple[str, Path]]:
    root = Path("/usr/share/doc")
    return _keyed("doc", root, _walk(root, lambda p: p.name == "copyright"))


def _metadata() -> List[Tuple[str, Path]]:
    return _dist_info_files(lambda p: p.name == "METADATA")


def _metadata_body(raw: bytes) -> bytes:
    """The long description: what follows the header block of a METADATA file."""
    return raw.replace(b"\r\n", b"\n").partition(b"\n\n")[2]


def _site_docs() -> List[Tuple[str, Path]]:
    found: Dict[str, Path] = {}
    for root in site_directories():

        def keep(path: Path) -> bool:
            return path.suffix in (".md", ".rst") and not _LICENCE_NAME.match(path.name)

        for key, path in _keyed("site", root, _walk(root, keep)):
            found.setdefault(key, path)
    return sorted(found.items())


POOL = Corpus(
    "python",
    "Python standard library source (*.py)",
    (Source("stdlib *.py", _stdlib_python),),
    doc_bytes=16384,
    eval_doc_bytes=4096,
    val_fraction=0.05,
    test_fraction=0.05,
)
DOMAINS: Tuple[Corpus, ...] = (
    Corpus(
        "c-headers",
        "C headers: Python's include directory, then /usr/include",
        (Source("python include/*.h", _python_headers), Source("/usr/include", _system_headers)),
        doc_bytes=4096,
        eval_doc_bytes=2048,
    ),
    Corpus(
        "licences",
        "licence texts: *.dist-info LICENSE/COPYING/NOTICE, /usr/share/common-licenses, "
        "then /usr/share/doc/*/copyright",
        (
            Source("*.dist-info licence files", _dist_licences),
            Source("/usr/share/common-licenses", _common_licences),
            Source("/usr/share/doc/*/copyright", _debian_copyright),
        ),
        doc_bytes=4096,
        eval_doc_bytes=2048,
    ),
    Corpus(
        "package-docs",
        "package descriptions (README prose): *.dist-info/METADATA bodies, then "
        "site-packages *.md/*.rst",
        (
            Source("*.dist-info/METADATA bodies", _metadata, _metadata_body),
            Source("site-packages *.md/*.rst", _site_docs),
        ),
        doc_bytes=8192,
        eval_doc_bytes=2048,
    ),
)


def _unit(text: str, salt: str) -> float:
    digest = hashlib.sha256(f"{salt}:{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(key: str, corpus: Corpus) -> str:
    """The split of the file with ``key``: a stable hash, not a random draw."""
    u = _unit(key, "split")
    if u < corpus.val_fraction:
        return "val"
    if u < corpus.val_fraction + corpus.test_fraction:
        return "test"
    return "train"


def fingerprint(text: bytes) -> str:
    """Hash of the text up to case, digits, copyright lines and whitespace."""
    lines = [ln for ln in text.lower().splitlines() if b"copyright" not in ln]
    normal = b" ".join(re.sub(rb"[0-9]", b"", b" ".join(lines)).split())
    return hashlib.sha256(normal).hexdigest()


def _document(raw: bytes, source: Source) -> Optional[bytes]:
    text = source.read(raw).replace(b"\r\n", b"\n").strip()
    if len(text) < MIN_DOC_BYTES or b"\x00" in text:
        return None
    try:
        text.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text


def _ordered(source: Source) -> Iterator[Tuple[str, Path]]:
    yield from sorted(source.files(), key=lambda item: (_unit(item[0], "order"), item[0]))


def read_corpus(corpus: Corpus, caps: Dict[str, int], seen: Optional[set] = None) -> Documents:
    """Documents of ``corpus`` per split until each split holds ``caps[split]`` bytes.

    ``seen`` holds fingerprints already taken (by other corpora) and is updated.
    """
    seen = set() if seen is None else seen
    documents = Documents(corpus.name, {s: [] for s in SPLITS}, {s: [] for s in SPLITS})
    filled = {s: 0 for s in SPLITS}
    listed: List[str] = []
    for source in corpus.sources:
        if all(filled[s] >= caps.get(s, 0) for s in SPLITS):
            break
        count = 0
        for key, path in _ordered(source):
            count += 1
            split = split_of(key, corpus)
            if filled[split] >= caps.get(split, 0):
                continue
            try:
                with open(path, "rb") as handle:
                    raw = handle.read(max(corpus.doc_bytes, 1 << 20))
            except OSError:
                continue
            text = _document(raw, source)
            if text is None:
                continue
            mark = fingerprint(text)
            if mark in seen:
                continue
            seen.add(mark)
            limit = corpus.doc_bytes if split == "train" else corpus.eval_doc_bytes
            text = text[: min(limit, caps[split] - filled[split])]
            documents.splits[split].append(text)
            documents.keys[split].append(key)
            filled[split] += len(text)
        listed.append(f"{source.name}: {count} files")
        documents.sources_used.append(source.name)
    short = [s for s in SPLITS if filled[s] < caps.get(s, 0)]
    if short:
        needs = ", ".join(f"{s} {filled[s]} of {caps[s]} bytes" for s in short)
        raise CorpusError(
            f"corpus {corpus.name!r} ({corpus.description}) is too small on this machine: "
            f"{needs} after all sources ({'; '.join(listed)}). Use a smaller --size, or "
            "install the missing sources."
        )
    return documents


def encode(documents: Sequence[bytes]) -> torch.Tensor:
    """One token stream: every document's bytes followed by :data:`SEPARATOR`."""
    tokens: List[int] = []
    for document in documents:
        tokens.extend(document)
        tokens.append(SEPARATOR)
    return torch.tensor(tokens, dtype=torch.long)


def windows(stream: torch.Tensor, length: int) -> torch.Tensor:
    """Non-overlapping rows of ``length + 1`` tokens (input and shifted target)."""
    count = (stream.numel() - 1) // length
    if count < 1:
        raise CorpusError(f"a stream of {stream.numel()} tokens is shorter than one window")
    index = torch.arange(count)[:, None] * length + torch.arange(length + 1)[None, :]
    return stream[index]


def take_bytes(documents: Sequence[bytes], start: int, volume: int) -> List[bytes]:
    """Bytes ``start`` to ``start + volume`` of the documents laid end to end, as documents."""
    out: List[bytes] = []
    position = 0
    for document in documents:
        end = position + len(document)
        lo, hi = max(start, position), min(start + volume, end)
        if lo < hi:
            out.append(document[lo - position : hi - position])
        position = end
    if sum(len(d) for d in out) < volume:
        raise CorpusError(f"asked for bytes {start}..{start + volume}, have {position}")
    return out


def shuffled(documents: Sequence[bytes], seed: int) -> List[bytes]:
    """The documents in a seeded order (a per-seed choice of which files an expert gets)."""
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    return [documents[i] for i in order]


def batches(rows: torch.Tensor, batch_size: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """``steps`` mini-batches from successive shuffled passes (epochs) over ``rows``."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if order.numel() == 0:
            order = torch.randperm(rows.shape[0], generator=generator)
        take, order = order[:batch_size], order[batch_size:]
        yield rows[take]


def steps_per_epoch(rows: int, batch_size: int) -> int:
    """Optimiser steps of one pass over ``rows`` windows (the last batch may be short)."""
    return -(-rows // batch_size)
