"""Parse a MediaWiki XML dump (bz2) and strip wiki markup with a simple cleaner.

The cleaner is deliberately simple (regular expressions, no template expansion):

1. drop ``<!-- comments -->``, ``<ref>..</ref>``/``<ref/>``, ``<gallery>``, ``<math>``
   and other HTML tags (their text kept unless listed);
2. drop templates ``{{...}}`` (innermost first, repeatedly, so nesting works) and
   tables ``{| ... |}``;
3. drop ``[[File:..]]``/``[[Image:..]]``/``[[Category:..]]`` links, turn
   ``[[target|label]]`` into ``label`` and ``[[target]]`` into ``target``;
   ``[http://x label]`` into ``label``;
4. drop bold/italic quotes, list bullets, HTML entities (unescaped);
5. split into sections at ``== Heading ==`` lines; drop "See also", "References",
   "External links", "Notes", "Further reading", "Bibliography" sections; keep
   paragraphs of at least 40 characters.

Infobox values, math and tables are lost; some stray markup may remain. Good enough
for stand-in prose; not a faithful renderer.
"""

from __future__ import annotations

import bz2
import html
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from .format import WorkloadError

SKIP_SECTIONS = {"see also", "references", "external links", "notes", "further reading",
                 "bibliography", "sources", "footnotes", "citations"}
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|.*?\|\}", re.S)
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)
_DROP_TAGS = re.compile(r"<(math|gallery|timeline|score|syntaxhighlight|source)[^>]*>.*?</\1>", re.S | re.I)
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_FILE_LINK = re.compile(r"\[\[(?:File|Image|Category|Media):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", re.I)
_LINK = re.compile(r"\[\[(?:[^\[\]|]*\|)?([^\[\]|]*)\]\]")
_EXT = re.compile(r"\[(?:https?|ftp)://[^\s\]]+\s*([^\]]*)\]")
_HEADING = re.compile(r"^(={2,6})\s*(.*?)\s*\1\s*$")


@dataclass
class WikiArticle:
    """A cleaned article: title, page id and its sections ``[(heading, paragraphs)]``."""

    title: str
    page_id: str
    sections: list[tuple[str, list[str]]]

    @property
    def text(self) -> str:
        parts = [self.title]
        for head, paras in self.sections:
            if head:
                parts.append(head)
            parts.extend(paras)
        return "\n\n".join(parts)


def clean_wikitext(text: str) -> list[tuple[str, list[str]]]:
    """Strip markup from raw wikitext; return ``[(heading, [paragraph, ...]), ...]``."""
    t = _COMMENT.sub("", text)
    t = _REF.sub("", t)
    t = _DROP_TAGS.sub("", t)
    for _ in range(20):  # nested templates, innermost first
        t2 = _TEMPLATE.sub("", t)
        if t2 == t:
            break
        t = t2
    t = _TABLE.sub("", t)
    t = _FILE_LINK.sub("", t)
    t = _LINK.sub(r"\1", t)
    t = _EXT.sub(r"\1", t)
    t = _TAG.sub("", t)
    t = t.replace("'''", "").replace("''", "")
    t = html.unescape(t)
    sections: list[tuple[str, list[str]]] = [("", [])]
    for line in t.split("\n"):
        line = line.strip()
        m = _HEADING.match(line)
        if m:
            sections.append((m.group(2).strip(), []))
            continue
        line = re.sub(r"^[*#:;]+\s*", "", line)
        line = re.sub(r"\s+", " ", line).strip()
        if len(line) >= 40 and not line.startswith(("{", "|", "!", "}")):
            sections[-1][1].append(line)
    return [(h, p) for h, p in sections if p and h.lower() not in SKIP_SECTIONS]


def parse_wiki_dump(path: str | Path) -> list[WikiArticle]:
    """Main-namespace, non-redirect articles of a ``.xml.bz2`` (or ``.xml``) dump."""
    p = Path(path)
    if not p.is_file():
        raise WorkloadError(f"{p}: no such wiki dump")
    opener = bz2.open if p.suffix == ".bz2" else open
    articles: list[WikiArticle] = []
    page_no = 0
    try:
        with opener(p, "rb") as f:
            for _, el in ET.iterparse(f):
                if el.tag != "page" and not el.tag.endswith("}page"):
                    continue
                page_no += 1
                ns = el.find("{*}ns")
                title = el.find("{*}title")
                pid = el.find("{*}id")
                text = el.find("{*}revision/{*}text")
                if title is None or text is None:
                    raise WorkloadError(f"{p}: page {page_no}: missing <title> or <revision><text>")
                if (ns is None or ns.text == "0") and el.find("{*}redirect") is None:
                    secs = clean_wikitext(text.text or "")
                    if secs:
                        articles.append(WikiArticle(title.text or "", pid.text if pid is not None else "",
                                                    secs))
                el.clear()
    except (ET.ParseError, OSError, EOFError) as e:
        raise WorkloadError(f"{p}: cannot parse wiki XML dump ({e})") from None
    if not articles:
        raise WorkloadError(f"{p}: dataset is empty (no articles)")
    return articles
