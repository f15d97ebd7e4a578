"""The tasks of the encoder benchmark: text classification built from files on this machine.

Four tasks, each from real text that a Debian system with Python ships and that no one in
this project wrote:

* ``language``: the language of a source file (Python from the standard library, C headers
  from ``/usr/include``, Perl modules, POSIX shell scripts from ``/usr/bin``).
* ``man-section``: the section of a man page (1, 2, 3, 5, 7 or 8), from the roff source.
* ``licence``: the licence family (GPL, LGPL, MIT/Expat/ISC, BSD, Apache) of the first
  ``License:`` field of a machine-readable Debian ``copyright`` file.
* ``stdlib-package``: which package of Python's standard library a module belongs to
  (``asyncio``, ``email``, ``importlib``, ``multiprocessing``, ``xml``, ``lib2to3``,
  ``distutils``).

Words that would give a label away are replaced by ``[MASK]`` (see each task's ``mask``):
shebang lines, file names with their extensions, language and interpreter names, section
numbers and section titles, licence names and short names, package names. A task's
examples are windows of ``Settings.length`` tokens cut from its files. Files are split into
train, validation and test by a hash of their path (file-disjoint), and a window whose
token sequence was already seen (in any split, any file) is dropped (de-duplicated).
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

MASK = "[MASK]"
MAX_CHARS = 12_000
"""Characters read from the start of each file (after cleaning), enough for several windows."""


class CorpusError(RuntimeError):
    """A task has too little text on this machine."""


@dataclass(frozen=True)
class Example:
    ids: Tuple[int, ...]
    label: int


@dataclass(frozen=True)
class Task:
    name: str
    classes: Tuple[str, ...]
    find: Callable[[int], Dict[str, List[Path]]]
    """Class name -> files (at most ``cap`` per class, chosen by a hash of the path)."""
    read: Callable[[Path], str]
    mask: Callable[[str], str]


def _digest(text: str) -> int:
    return int(hashlib.sha1(text.encode()).hexdigest()[:12], 16)


def _cap(paths: Sequence[str], cap: int) -> List[Path]:
    """At most ``cap`` files, chosen by a hash of their path (stable across machines)."""
    unique = sorted(set(paths))
    return [Path(p) for p in sorted(unique, key=_digest)[:cap]]


def _words(words: Sequence[str]) -> re.Pattern[str]:
    return re.compile(r"(?i)\b(" + "|".join(words) + r")\b")


def _plain(path: Path) -> str:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8", errors="replace") as stream:
                return stream.read(4 * MAX_CHARS)
        with path.open(encoding="utf-8", errors="replace") as stream:
            return stream.read(4 * MAX_CHARS)
    except OSError:
        return ""


# -- language of a source file --------------------------------------------------------------

_SHEBANG = re.compile(r"(?m)^#!.*$")
_FILENAME = re.compile(r"\S+\.(py|pyc|pm|pl|pod|h|hpp|c|cc|sh|bash|t)\b")
_LANGUAGE_WORDS = _words(
    [
        "python[0-9.]*",
        "cpython",
        "perl[0-9]*",
        "perldoc",
        "pod",
        "bash",
        "sh",
        "dash",
        "zsh",
        "shell",
        "posix",
        "c",
        "c\\+\\+",
        "gcc",
        "clang",
        "glibc",
        "libc",
        "ansi",
        "iso c",
    ]
)


def _is_shell(path: str) -> bool:
    try:
        with open(path, "rb") as stream:
            head = stream.read(40)
    except OSError:
        return False
    return bool(re.match(rb"#! ?(/usr)?/bin/(env )?(ba|da)?sh\b", head))


def _find_languages(cap: int) -> Dict[str, List[Path]]:
    perl = glob.glob("/usr/share/perl/*/**/*.pm", recursive=True)
    perl += glob.glob("/usr/share/perl5/**/*.pm", recursive=True)
    scripts = sorted(glob.glob("/usr/bin/*") + glob.glob("/usr/sbin/*"))
    return {
        "python": _cap(glob.glob("/usr/lib/python3*/**/*.py", recursive=True), cap),
        "c": _cap(glob.glob("/usr/include/**/*.h", recursive=True), cap),
        "perl": _cap(perl, cap),
        "shell": _cap([p for p in scripts if Path(p).is_file() and _is_shell(p)], cap),
    }


def _mask_language(text: str) -> str:
    text = _SHEBANG.sub("", text)
    text = _FILENAME.sub(MASK, text)
    return _LANGUAGE_WORDS.sub(MASK, text)


# -- section of a man page ------------------------------------------------------------------

SECTIONS = ("1", "2", "3", "5", "7", "8")
_ROFF_TEXT = re.compile(r"^\.(?:B|I|BI|BR|IB|IR|RB|RI|SH|SS|SM|SB|TP|IP|Nm|Nd|Sh|Xr|Fn|Fa)\s+")
_ESCAPE = re.compile(r"\\f(\[[^\]]*\]|\(..|.)|\\\(..|\\\[[^\]]*\]|\\[-&e|^0 ]|\\\*\(?..")
_SECTION_REF = re.compile(r"\((\d)[a-z]*\)")
_SECTION_WORDS = _words(
    [
        "section",
        "sections",
        "system calls?",
        "syscalls?",
        "library (functions?|calls?)",
        "file formats?",
        "configuration files?",
        "miscellan\\w*",
        "user commands?",
        "administration( commands?)?",
        "system administration\\w*",
        "overview",
        "conventions",
        "man[1-8]",
        "manpages?",
    ]
)


def _find_man(cap: int) -> Dict[str, List[Path]]:
    found = {}
    for section in SECTIONS:
        paths = glob.glob(f"/usr/share/man/man{section}/*.gz")
        found[section] = _cap(paths, cap)
    return found


def _read_man(path: Path) -> str:
    source = _plain(path)
    if source.startswith(".so ") or len(source) < 400:
        return ""
    lines = []
    for line in source.splitlines():
        if line.startswith(".TH") or line.startswith(".Dt") or line.startswith('.\\"'):
            continue
        if line.startswith(".") or line.startswith("'"):
            match = _ROFF_TEXT.match(line)
            if not match:
                continue
            line = line[match.end() :].replace('"', "")
        lines.append(_ESCAPE.sub("", line))
    return "\n".join(lines)


def _mask_man(text: str) -> str:
    text = _SECTION_REF.sub(f"({MASK})", text)
    return _SECTION_WORDS.sub(MASK, text)


# -- licence family of a Debian copyright file ----------------------------------------------

FAMILIES = ("gpl", "lgpl", "mit", "bsd", "apache")
_LICENSE_FIELD = re.compile(r"(?m)^License:[ \t]*(\S[^\n]*)$")
_LICENCE_WORDS = _words(
    [
        "l?gpl[\\w.+-]*",
        "gnu",
        "general public licen[cs]es?",
        "lesser",
        "library general",
        "bsd[\\w.-]*",
        "berkeley",
        "regents",
        "mit",
        "expat",
        "x11",
        "isc",
        "apache[\\w.-]*",
        "artistic",
        "mpl[\\w.-]*",
        "mozilla",
        "zlib",
        "public[- ]domain",
        "cc0[\\w.-]*",
        "creative commons",
        "free software foundation",
        "fsf",
        "spdx[\\w-]*",
    ]
)


def _family(short_name: str) -> Optional[str]:
    name = short_name.strip().split()[0].lower() if short_name.strip() else ""
    if name.startswith("lgpl"):
        return "lgpl"
    if name.startswith("gpl"):
        return "gpl"
    if name.startswith(("mit", "expat", "isc", "x11")):
        return "mit"
    if name.startswith("bsd"):
        return "bsd"
    if name.startswith("apache"):
        return "apache"
    return None


def _find_licences(cap: int) -> Dict[str, List[Path]]:
    found: Dict[str, List[str]] = {family: [] for family in FAMILIES}
    seen = set()
    for path in sorted(glob.glob("/usr/share/doc/*/copyright")):
        text = _plain(Path(path))
        if "copyright-format" not in text[:300] or text in seen:
            continue
        seen.add(text)
        match = _LICENSE_FIELD.search(text)
        family = _family(match.group(1)) if match else None
        if family is not None:
            found[family].append(path)
    return {family: _cap(paths, cap) for family, paths in found.items()}


def _read_licence(path: Path) -> str:
    text = _plain(path)
    # Field names and the file's header carry no content; the licence short names go too.
    text = re.sub(r"(?m)^(Format|Upstream-Name|Upstream-Contact|Source|License):.*$", "", text)
    return text


def _mask_licence(text: str) -> str:
    return _LICENCE_WORDS.sub(MASK, text)


# -- package of Python's standard library ---------------------------------------------------

PACKAGES = ("asyncio", "email", "importlib", "multiprocessing", "xml", "lib2to3", "distutils")
_PACKAGE_WORDS = _words(
    [
        *PACKAGES,
        "2to3",
        "fixer",
        "fixers",
        "mime",
        "dom",
        "minidom",
        "sax",
        "etree",
        "expat",
        "metadata",
        "resources",
        "pgen2?",
        "msvc\\w*",
        "ccompiler",
        "mailbox",
        "smtp\\w*",
    ]
)


def _find_packages(cap: int) -> Dict[str, List[Path]]:
    found = {}
    for package in PACKAGES:
        found[package] = _cap(
            glob.glob(f"/usr/lib/python3*/{package}/**/*.py", recursive=True), cap
        )
    return found


def _mask_package(text: str) -> str:
    return _PACKAGE_WORDS.sub(MASK, _FILENAME.sub(MASK, text))


TASKS = (
    Task("language", ("python", "c", "perl", "shell"), _find_languages, _plain, _mask_language),
    Task("man-section", SECTIONS, _find_man, _read_man, _mask_man),
    Task("licence", FAMILIES, _find_licences, _read_licence, _mask_licence),
    Task("stdlib-package", PACKAGES, _find_packages, _plain, _mask_package),
)


# -- windows and splits ---------------------------------------------------------------------

SPLITS = ("train", "validation", "test")


def split_of(path: Path) -> str:
    """File-disjoint split by a hash of the path: 70% train, 10% validation, 20% test."""
    bucket = _digest(str(path)) % 10
    return "train" if bucket < 7 else ("validation" if bucket == 7 else "test")


@dataclass
class Pool:
    """One task's examples per split, in a fixed order (every size's subsets are prefixes)."""

    task: Task
    splits: Dict[str, List[Example]]
    files: Dict[str, int]


def build_pool(
    task: Task, tokenizer, length: int, windows: int, files_per_class: int, seen: set
) -> Pool:
    """Cut up to ``windows`` windows of ``length - 2`` tokens from each file, drop repeats.

    Windows are spread evenly over the file's (masked) text; ``seen`` holds every token
    sequence already used, by any task and split, so a repeat is dropped wherever it is.
    The examples of each split are interleaved class by class so that any prefix is
    balanced as far as the classes allow.
    """
    body = length - 2
    per_class: Dict[str, Dict[int, List[Example]]] = {s: {} for s in SPLITS}
    files = {s: 0 for s in SPLITS}
    for label, (_name, paths) in enumerate(task.find(files_per_class).items()):
        for path in paths:
            text = task.mask(task.read(path))[:MAX_CHARS]
            text = re.sub(r"\s+", " ", text).strip()
            if len(text) < 80:
                continue
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) < body:
                continue
            count = min(windows, len(ids) // body)
            starts = [round(i * (len(ids) - body) / max(count - 1, 1)) for i in range(count)]
            split = split_of(path)
            kept = 0
            for start in starts:
                window = tuple(ids[start : start + body])
                if window in seen:
                    continue
                seen.add(window)
                per_class[split].setdefault(label, []).append(Example(window, label))
                kept += 1
            files[split] += kept > 0
    splits = {}
    for split, groups in per_class.items():
        interleaved: List[Example] = []
        for row in range(max((len(g) for g in groups.values()), default=0)):
            interleaved += [g[row] for _, g in sorted(groups.items()) if row < len(g)]
        splits[split] = interleaved
    return Pool(task, splits, files)


def build_pools(
    tokenizer, length: int, windows: int, files_per_class: int, need: Dict[str, int]
) -> List[Pool]:
    """Every task's pool; :class:`CorpusError` if a split has fewer than ``need[split]``."""
    seen: set = set()
    pools = []
    for task in TASKS:
        pool = build_pool(task, tokenizer, length, windows, files_per_class, seen)
        for split, count in need.items():
            if len(pool.splits[split]) < count:
                raise CorpusError(
                    f"task {task.name}: {len(pool.splits[split])} {split} examples, "
                    f"{count} needed; its text is too small on this machine"
                )
        pools.append(pool)
    return pools
