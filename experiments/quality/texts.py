"""Documents and instructions of the quality evaluation (offline stand-ins, no hub).

Domains (``documents``), each document with an id and a first sentence (the reference
of the copy task):

* ``news``: Lee news articles (gensim test data), 200-700 tokens. The project's own
  workloads are built from them (tuned on).
* ``wiki``: Wikipedia article bodies (gensim's shortened dump), title removed, cut to
  at most 800 tokens on a paragraph boundary (``multi-instruction-long`` uses this dump).
* ``dialogue``: chatterbot-corpus conversations of one topic file written out as a
  ``User:``/``Bot:`` transcript of about 300-450 tokens. Never used by the project:
  held-out only.
* ``faq``: AlpacaEval instruction/answer pairs written out as a ``Q:``/``A:`` page of
  about 350-550 tokens. Never used by the project: held-out only.
* ``passages`` (multi-document cases): Wikipedia passages of 100-250 tokens with their
  article title as topic.

Instructions come in two disjoint sets, ``dev`` (used to choose the recompute rule) and
``heldout`` (only for reporting). Each has an intent, a text and an equivalent rewording
(the ``para`` noise floor); lengths range from 6 to about 70 tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

LONG_DEV = ("You are helping an editor prepare a digest. Read the text below carefully and write a "
            "faithful summary of about three sentences. Keep names, numbers and dates exactly as they "
            "appear, do not add facts that are not in the text, and do not give your own opinion.")
LONG_DEV_P = ("An editor is preparing a digest and needs your help. Carefully read the following text, "
              "then write a summary of roughly three sentences that is faithful to it. Keep every name, "
              "number and date as written, add no facts the text does not state, and leave out your own "
              "opinions.")
LONG_HO = ("Imagine you are a teacher preparing a short reading quiz. After reading the text below, write "
           "one multiple-choice question about its main point, with four options labelled A to D, and "
           "say which option is correct. Make sure the question can be answered from the text alone.")
LONG_HO_P = ("Suppose you are a teacher who is putting together a short reading quiz. Read the following "
             "text, then write one multiple-choice question on its main point with four options, A to D, "
             "and state which option is the correct one. The question must be answerable from the text "
             "alone.")

# (intent, text, equivalent rewording)
INSTRUCTIONS = {
    "dev": [
        ("summary", "Summarize the text below.", "Write a summary of the following text."),
        ("bullets", "List the three most important points of the text below as bullet points.",
         "Give the three key points of the following text as a bulleted list."),
        ("keywords", "Give five keywords that describe the following text.",
         "Name five keywords for the text below."),
        ("simple", "Explain the text below to a ten-year-old in two sentences.",
         "In two sentences, explain the following text so that a ten-year-old understands it."),
        ("digest", LONG_DEV, LONG_DEV_P),
        ("first", "Copy the first sentence of the text below exactly.",
         "Write out the first sentence of the following text exactly as it is."),
    ],
    "heldout": [
        ("about", "What is this text about? Answer in one sentence.",
         "In one sentence, what is the following text about?"),
        ("title", "Write a short title for the text below.", "Suggest a brief title for the following text."),
        ("names", "Which people, places or organisations are mentioned in the following text?",
         "List the people, places and organisations that the text below mentions."),
        ("questions", "Write three questions a reader might ask after reading this text.",
         "After reading the text below, what three questions might a reader ask?"),
        ("quiz", LONG_HO, LONG_HO_P),
        ("first", "Repeat, word for word, the opening sentence of the following text.",
         "Quote the opening sentence of the text below word for word."),
    ],
}
# multi-document (RAG) prompts: header before the documents, question after them
RAG_HEADERS = {
    "dev": ("Answer the question using only the documents below.",
            "Use only the following documents to answer the question."),
    "heldout": ("Read the documents below and answer the question at the end.",
                "Read the following documents, then answer the question that comes after them."),
}
RAG_QUESTIONS = {
    "dev": ("What does Document {j} say about {topic}?", "Which document mentions {topic}, and what does it say?"),
    "heldout": ("Summarize what the documents say about {topic}.", "Based on the documents, what is {topic}?"),
}


@dataclass(frozen=True)
class Doc:
    doc_id: str
    domain: str
    text: str
    topic: str = ""

    @property
    def first_sentence(self) -> str:
        first = self.text.strip().split("\n", 1)[0]
        return re.split(r"(?<=[.!?])\s+", first, maxsplit=1)[0].strip()


def _ntok(tok, s: str) -> int:
    return len(tok.encode(s, add_special_tokens=False))


def _cut_paragraphs(tok, paras: list[str], max_tokens: int) -> str:
    out: list[str] = []
    for p in paras:
        if out and _ntok(tok, "\n".join(out + [p])) > max_tokens:
            break
        out.append(p)
    text = "\n".join(out)
    if _ntok(tok, text) > max_tokens:  # one long paragraph: cut on a sentence boundary
        sents = re.split(r"(?<=[.!?])\s+", text)
        text = _cut_paragraphs(tok, sents, max_tokens).replace("\n", " ")
    return text


def news_docs(tok, root=None) -> list[Doc]:
    from experiments.workloads.standins import load_news

    news, _ = load_news(root)
    seen, out = set(), []
    for line, text in news:
        if text in seen or not 200 <= _ntok(tok, text) <= 700:
            continue
        seen.add(text)
        out.append(Doc(f"news:line{line}", "news", text))
    return out


def wiki_docs(tok, root=None, max_tokens: int = 800) -> list[Doc]:
    from experiments.workloads.standins import load_wiki

    arts, _ = load_wiki(root)
    out = []
    for a in arts:
        if a.title.startswith("List of") or len(a.title) < 2:
            continue
        paras = [p for _, ps in a.sections for p in ps]
        text = _cut_paragraphs(tok, paras, max_tokens)
        if _ntok(tok, text) >= 250:
            out.append(Doc(f"wiki:{a.title}", "wiki", text, a.title))
    return out


def passage_docs(tok, root=None) -> list[Doc]:
    from experiments.workloads.standins import load_wiki, wiki_passages

    arts, _ = load_wiki(root)
    out = []
    for i, (title, head, text) in enumerate(wiki_passages(arts, max_words=120)):
        if title.startswith("List of") or not 100 <= _ntok(tok, text) <= 250:
            continue
        out.append(Doc(f"passage:{title}:{i}", "passage", text, title))
    return out


def dialogue_docs(tok, root=None, lo: int = 300, hi: int = 450) -> list[Doc]:
    from experiments.workloads.standins import load_dialogues

    dias, _ = load_dialogues(root)
    by_file: dict[str, list[list[str]]] = {}
    for where, lines in dias:
        by_file.setdefault(where.split(":")[0], []).append(lines)
    out = []
    for name, convs in sorted(by_file.items()):
        buf: list[str] = []
        part = 0
        for lines in convs:
            buf += [f"{'User' if i % 2 == 0 else 'Bot'}: {x}" for i, x in enumerate(lines)]
            if _ntok(tok, "\n".join(buf)) >= lo:
                text = _cut_paragraphs(tok, buf, hi)
                out.append(Doc(f"dialogue:{name}:{part}", "dialogue", text, name.removesuffix(".yml")))
                buf, part = [], part + 1
    return out


def faq_docs(tok, root=None, lo: int = 350, hi: int = 550) -> list[Doc]:
    from experiments.workloads.standins import load_instructions, download_package, _find
    import json

    load_instructions(root)  # fetches and validates the file
    rows = json.loads(_find(download_package("alpaca-eval", root), "*example/outputs.json")[0].read_text())
    out, buf = [], []
    for i, r in enumerate(rows):
        buf.append(f"Q: {r['instruction'].strip()}\nA: {r['output'].strip()}")
        if _ntok(tok, "\n".join(buf)) >= lo:
            text = _cut_paragraphs(tok, buf, hi)
            if _ntok(tok, text) >= lo * 0.6:
                out.append(Doc(f"faq:rows..{i}", "faq", text))
            buf = []
    return out


LOADERS = {"news": news_docs, "wiki": wiki_docs, "dialogue": dialogue_docs, "faq": faq_docs,
           "passage": passage_docs}
TUNED_DOMAINS = ("news", "wiki", "passage")     # split by document into dev / held-out
HELDOUT_DOMAINS = ("dialogue", "faq")          # the project never used these: held-out only


def split_of(key: str, seed: int) -> str:
    """``dev`` or ``heldout`` for a document key, from a seeded hash (the same key lands in
    the same split in every domain)."""
    import xxhash

    return "dev" if xxhash.xxh64_intdigest(key.encode(), seed=seed) % 2 == 0 else "heldout"


def split_docs(docs: list[Doc], seed: int) -> dict[str, list[Doc]]:
    """Deterministic split of a domain's documents into dev and held-out, by topic where
    there is one: a Wikipedia article's body and its passages land in the same split, so
    no held-out text is seen in dev."""
    out: dict[str, list[Doc]] = {"dev": [], "heldout": []}
    for d in docs:
        out[split_of(d.topic or d.doc_id, seed)].append(d)
    return out
