"""Chat-formatted evaluation cases: a target prompt, the stored copy's prompt, and the
noise-floor variants of the target.

A case is one request a user sends (``target``) whose document(s) the server has seen
before inside another prompt (``source``: the stored copy's context). Prompts go through
the model's chat template (``tokenizer.apply_chat_template``), as ``/v1/chat/completions``
would send them.

* single-document: ``{instruction}\\n\\n{document}``; the source has another
  instruction (another intent and length) of the same split before the same document.
* multi-document (RAG): ``{header}\\n\\nDocument 1:\\n...\\n\\nQuestion: {question}``;
  the source shares two of the target's three passages, at other positions, next to
  another passage, under another question.

Noise floors (``FLOORS``), changes that should not matter, scored like reuse:
``ws`` a trailing space after the instruction (or header), ``nl`` one more newline
between instruction and document, ``sys`` the default system prompt reworded
(explicit), ``para`` the instruction (or header) reworded. Optional ``same``: the target
itself, run again (in the engine, in another batch: the floor of numerics alone; 0 in
the simulator).

Splits: ``dev`` (used to choose the recompute rule) and ``heldout`` (reported
separately): disjoint documents and disjoint instruction sets; the ``dialogue`` and
``faq`` domains are held-out only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import texts

FLOORS = ("ws", "nl", "sys", "para")
EXTRA_FLOORS = ("same",)   # the target itself, run again: the backend's own numeric noise
SYSTEM_REWORDED = "You are SmolLM, a helpful AI assistant trained by Hugging Face."
SPLITS = ("dev", "heldout")
DOMAINS = {"dev": ("news", "wiki", "rag"), "heldout": ("news", "wiki", "dialogue", "faq", "rag")}


@dataclass
class Case:
    case_id: str
    split: str
    domain: str
    kind: str                              # "single" or "multi-doc"
    target: list[int]
    source: list[int]
    variants: dict[str, list[int]] = field(default_factory=dict)
    answer: str | None = None              # task reference (copy-the-first-sentence intent)
    info: dict = field(default_factory=dict)
    alt_sources: dict[str, list[int]] = field(default_factory=dict)  # other stored contexts


def chat_ids(tok, user: str, system: str | None = None) -> list[int]:
    """Token ids of a one-turn chat through the tokenizer's chat template (with the
    assistant header, as a server adds for a completion)."""
    if not getattr(tok, "chat_template", None):
        raise ValueError("the model's tokenizer has no chat template")
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return list(tok.encode(text, add_special_tokens=False))


def _single(tok, split: str, doc: texts.Doc, ti: int, si: int, cid: str) -> Case:
    ins = texts.INSTRUCTIONS[split]
    (intent, t, tp), (s_intent, s, _) = ins[ti], ins[si]

    def user(instr: str, sep: str = "\n\n") -> str:
        return f"{instr}{sep}{doc.text}"

    return Case(
        cid, split, doc.domain, "single", chat_ids(tok, user(t)), chat_ids(tok, user(s)),
        {"same": chat_ids(tok, user(t)), "ws": chat_ids(tok, user(t + " ")), "nl": chat_ids(tok, user(t, "\n\n\n")),
         "sys": chat_ids(tok, user(t), SYSTEM_REWORDED), "para": chat_ids(tok, user(tp))},
        doc.first_sentence if intent == "first" else None,
        {"doc": doc.doc_id, "intent": intent, "source_intent": s_intent,
         "instr_tokens": len(tok.encode(t, add_special_tokens=False)),
         "source_instr_tokens": len(tok.encode(s, add_special_tokens=False))},
        {f"instr:{ins[j][0]}": chat_ids(tok, user(ins[j][1])) for j in range(len(ins)) if j != ti})


def _rag_user(header: str, docs: list[texts.Doc], question: str) -> str:
    body = "\n\n".join(f"Document {i + 1}:\n{d.text}" for i, d in enumerate(docs))
    return f"{header}\n\n{body}\n\nQuestion: {question}"


def _rag(tok, split: str, tgt: list[texts.Doc], src: list[texts.Doc], rng, cid: str) -> Case:
    header, header_p = texts.RAG_HEADERS[split]
    qs = texts.RAG_QUESTIONS[split]
    j = int(rng.integers(len(tgt)))
    q = qs[0].format(j=j + 1, topic=tgt[j].topic) if "{j}" in qs[0] else qs[0].format(topic=tgt[j].topic)
    sj = int(rng.integers(len(src)))
    sq = qs[1].format(topic=src[sj].topic)

    def ids(h: str, system: str | None = None, docs=tgt, question=q) -> list[int]:
        return chat_ids(tok, _rag_user(h, docs, question), system)

    return Case(
        cid, split, "rag", "multi-doc", ids(header), ids(header, docs=src, question=sq),
        {"same": ids(header), "ws": ids(header + " "), "nl": chat_ids(tok, _rag_user(header + "\n", tgt, q)),
         "sys": ids(header, SYSTEM_REWORDED), "para": ids(header_p)},
        None, {"docs": [d.doc_id for d in tgt], "source_docs": [d.doc_id for d in src],
               "shared_docs": len({d.doc_id for d in tgt} & {d.doc_id for d in src}),
               "intent": "rag", "source_intent": "rag"})


def rag_sets(pool: list[texts.Doc], n: int, rng) -> list[tuple[list[texts.Doc], list[texts.Doc]]]:
    """``n`` (target, source) passage lists of 3: the source holds two of the target's
    passages, each at another position, and one passage of its own."""
    out = []
    for _ in range(n):
        pick = [pool[int(i)] for i in rng.choice(len(pool), 4, replace=False)]
        tgt, extra = pick[:3], pick[3]
        a, b = sorted(rng.choice(3, 2, replace=False).tolist())
        # positions 0..2 for (tgt[a], tgt[b], extra), with tgt[a] and tgt[b] both moved
        perms = [p for p in ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))
                 if p[0] != a and p[1] != b]
        p = perms[int(rng.integers(len(perms)))]
        src: list = [None] * 3
        for doc, pos in zip((tgt[a], tgt[b], extra), p):
            src[pos] = doc
        out.append((tgt, src))
    return out


def build_cases(tok, n: int, seed: int = 0, splits=SPLITS, domains: dict | None = None,
                root=None) -> list[Case]:
    """``n`` cases per (split, domain); deterministic for a seed."""
    domains = domains or DOMAINS
    cache: dict[str, dict[str, list[texts.Doc]]] = {}

    def docs(domain: str, split: str) -> list[texts.Doc]:
        name = "passage" if domain == "rag" else domain
        if name not in cache:
            all_docs = texts.LOADERS[name](tok, root)
            cache[name] = (texts.split_docs(all_docs, seed) if name in texts.TUNED_DOMAINS
                           else {"dev": [], "heldout": all_docs})
        return cache[name][split]

    cases: list[Case] = []
    for split in splits:
        n_ins = len(texts.INSTRUCTIONS[split])
        for domain in domains[split]:
            pool = docs(domain, split)
            rng = np.random.default_rng([seed, SPLITS.index(split), sum(map(ord, domain))])
            if domain == "rag":
                if len(pool) < 4:
                    raise ValueError(f"{split}/rag: only {len(pool)} passages")
                for i, (tgt, src) in enumerate(rag_sets(pool, n, rng)):
                    cases.append(_rag(tok, split, tgt, src, rng, f"{split}-rag-{i:02d}"))
                continue
            if len(pool) < n:
                raise ValueError(f"{split}/{domain}: {len(pool)} documents, {n} cases asked")
            for i, d in enumerate(pool[j] for j in rng.permutation(len(pool))[:n]):
                ti = i % n_ins
                si = int(rng.choice([j for j in range(n_ins) if j != ti]))
                cases.append(_single(tok, split, d, ti, si, f"{split}-{domain}-{i:02d}"))
    return cases
