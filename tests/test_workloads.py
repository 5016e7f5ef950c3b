"""Tests for experiments.workloads: format, loaders, stand-in parsers, generators, CLI.

No network: the stand-in cache is faked with small fixture files shaped like the real
ones (a .cor file, a bz2 wiki XML dump, AlpacaEval's outputs.json, chatterbot yml),
placed where ``download_package`` finds them, and the tokenizer is a small BPE
trained here.
"""

from __future__ import annotations

import bz2
import json
import pickle
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments.workloads import WorkloadError, load_workload, meta_path
from experiments.workloads.cli import main
from experiments.workloads.real import load_pickle_units
from experiments.workloads.sharing import shareable_fractions
from experiments.workloads.standins import parse_alpaca_eval, parse_chatterbot, parse_lee_cor
from experiments.workloads.wikitext import clean_wikitext, parse_wiki_dump

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the of and to in a is that for on with as by at from minister police government fire "
         "people said would year new two first last state officials city report court water "
         "after before during against between under over about storm company bank market").split()


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def _article(rng: random.Random, sentences: int = 6) -> str:
    return " ".join(_sentence(rng, rng.randint(8, 16)) for _ in range(sentences))


# ---------------------------------------------------------------- brute force (independent)

def brute_fractions(prompts: list[list[int]], w: int = 32) -> tuple[float, float, float]:
    """Prefix / run / non-prefix-run shareable fractions by exhaustive comparison."""
    total = sum(len(p) for p in prompts)
    lcps = []
    for i, p in enumerate(prompts):
        best = 0
        for q in prompts[:i]:
            k = 0
            while k < len(p) and k < len(q) and p[k] == q[k]:
                k += 1
            best = max(best, k)
        lcps.append(best)
    earlier: set = set()
    run = nonprefix = 0
    for p, lcp in zip(prompts, lcps):
        covered = [False] * len(p)
        local: set = set()
        for s in range(len(p) - w + 1):
            win = tuple(p[s:s + w])
            if win in earlier or win in local:
                for j in range(s, s + w):
                    covered[j] = True
            local.add(win)
        earlier |= local
        run += sum(covered)
        nonprefix += sum(covered[lcp:])
    return sum(lcps) / total, run / total, nonprefix / total


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> Path:
    """A small byte-level BPE tokenizer trained on generated text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(0)
    text = [_article(rng) for _ in range(200)] + ["User: Assistant: System: Summarize Article Question"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(text, trainer)
    d = tmp_path_factory.mktemp("tok")
    tok.save(str(d / "tokenizer.json"))
    return d


WIKI_XML = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">
  <siteinfo><sitename>Wikipedia</sitename></siteinfo>
  {pages}
  <page><title>Redirected</title><ns>0</ns><id>99</id><redirect title="Alpha" />
    <revision><text xml:space="preserve">#REDIRECT [[Alpha]]</text></revision></page>
  <page><title>Wikipedia:About</title><ns>4</ns><id>98</id>
    <revision><text xml:space="preserve">Project page text that is long enough to be kept.</text></revision></page>
</mediawiki>"""
PAGE = """<page><title>{title}</title><ns>0</ns><id>{id}</id><revision><text xml:space="preserve">
{{{{Infobox thing|name={{{{nested|x}}}}}}}}
'''{title}''' is a [[topic|subject]] of [[study]].&lt;ref&gt;A citation&lt;/ref&gt; {body}
[[File:Picture.jpg|thumb|a caption]]
== History ==
{body2} See [http://example.org the site].
== References ==
{{{{reflist}}}} References section text that should be dropped entirely here.
</text></revision></page>"""


def make_standin_cache(root: Path, n_articles: int = 30) -> Path:
    """Fake ``$KVDEDUP_CACHE/data/standins`` with fixture files shaped like the real ones."""
    rng = random.Random(1)
    st = root / "data" / "standins"
    g = st / "gensim-4.4.0" / "gensim" / "test" / "test_data"
    g.mkdir(parents=True)
    (g / "lee_background.cor").write_text("\n".join(_article(rng) for _ in range(n_articles)) + "\n")
    pages = "\n".join(PAGE.format(title=f"Topic{i}", id=i, body=_article(rng, 5), body2=_article(rng, 8))
                      for i in range(6))
    with bz2.open(g / "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2", "wt") as f:
        f.write(WIKI_XML.format(pages=pages))
    a = st / "alpaca-eval-0.6.6" / "example"
    a.mkdir(parents=True)
    (a / "outputs.json").write_text(json.dumps(
        [{"instruction": _sentence(rng, 10), "output": "x", "generator": "example", "dataset": "d",
          "datasplit": "eval"} for _ in range(12)]))
    c = st / "chatterbot-corpus-1.3.3" / "chatterbot_corpus" / "data" / "english"
    c.mkdir(parents=True)
    convs = [[_sentence(rng, 6) for _ in range(rng.choice((2, 4, 6)))] for _ in range(15)]
    (c / "greetings.yml").write_text(json.dumps({"categories": ["greetings"], "conversations": convs}))
    (c / "trivia.yml").write_text("categories:\n- trivia\nconversations:\n- - Q one?\n  - A one.\n"
                                  "- 'a quirk: a string, not a list'\n")
    for d in ("gensim-4.4.0", "alpaca-eval-0.6.6", "chatterbot-corpus-1.3.3"):
        (st / d / "SOURCE.json").write_text(json.dumps({"requirement": d, "licence": "fixture"}))
    return st


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("KVDEDUP_CACHE", str(tmp_path / "cache"))
    make_standin_cache(tmp_path / "cache")
    return tmp_path / "cache"


def run_cli(args: list, capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def prompts_of(path: Path) -> list[list[int]]:
    return [r.prompt_token_ids for r in load_workload(path).requests]


# ---------------------------------------------------------------- format

def test_roundtrip_and_meta(tmp_path, capsys):
    p = tmp_path / "w.jsonl"
    rows = [{"prompt_token_ids": [1, 2, 3], "output_len": 5, "arrival_time": None, "session_id": None,
             "source": "a"},
            {"prompt_token_ids": [1, 2, 4], "output_len": 1, "arrival_time": 0.5, "session_id": "s",
             "source": "b", "turn": 0}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    wl = load_workload(p)
    assert len(wl.requests) == 2 and wl.meta == {}
    assert wl.requests[1].extra == {"turn": 0} and wl.requests[1].arrival_time == 0.5
    rc, out, _ = run_cli(["show", p], capsys)
    assert rc == 0 and "2 requests" in out and "p99" in out


@pytest.mark.parametrize("line,needle", [
    ('{"prompt_token_ids": [1, 2', "bad JSON"),
    ('{"prompt_token_ids": [1], "output_len": 3, "arrival_time": null, "session_id": null}', "source"),
    ('{"prompt_token_ids": [1, "x"], "output_len": 3, "arrival_time": null, "session_id": null, "source": ""}',
     "prompt_token_ids[1]"),
    ('{"prompt_token_ids": [1, true], "output_len": 3, "arrival_time": null, "session_id": null, "source": ""}',
     "prompt_token_ids[1]"),
    ('{"prompt_token_ids": [1], "output_len": 0, "arrival_time": null, "session_id": null, "source": ""}',
     "output_len"),
    ('[1, 2]', "JSON object"),
])
def test_malformed_rows_name_file_and_line(tmp_path, capsys, line, needle):
    p = tmp_path / "bad.jsonl"
    good = '{"prompt_token_ids": [1], "output_len": 3, "arrival_time": null, "session_id": null, "source": ""}'
    p.write_text(good + "\n" + line + "\n")
    with pytest.raises(WorkloadError, match=re.escape(needle)) as e:
        load_workload(p)
    assert f"{p}:2" in str(e.value)
    rc, out, err = run_cli(["show", p], capsys)
    assert rc == 2 and err.startswith("error: ") and f"{p}:2" in err and "Traceback" not in err


def test_missing_and_empty_workload(tmp_path, capsys):
    with pytest.raises(WorkloadError, match="no such workload file"):
        load_workload(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(WorkloadError, match="empty"):
        load_workload(tmp_path / "empty.jsonl")


# ---------------------------------------------------------------- shareable fractions

def test_fractions_match_brute_force_on_random_prompts():
    rng = random.Random(3)
    segs = [[rng.randrange(50) for _ in range(rng.randint(5, 70))] for _ in range(8)]
    prompts = []
    for _ in range(25):
        p = []
        for _ in range(rng.randint(1, 4)):
            p += rng.choice(segs) if rng.random() < 0.7 else [rng.randrange(50) for _ in range(20)]
        prompts.append(p)
    prompts.append([7] * 80)  # repeats inside one prompt
    prompts.append(list(prompts[3]))  # exact duplicate
    got = shareable_fractions(prompts)
    want = brute_fractions(prompts)
    assert got["prefix_shareable_fraction"] == pytest.approx(want[0], abs=1e-6)
    assert got["run_shareable_fraction"] == pytest.approx(want[1], abs=1e-6)
    assert got["nonprefix_run_shareable_fraction"] == pytest.approx(want[2], abs=1e-6)
    assert 0 < want[0] < want[1]


# ---------------------------------------------------------------- generators (via the CLI)

GEN_ARGS = {
    "shared-template": ["--template-tokens", "64"],
    "multi-instruction": ["--instructions", "3"],
    "multi-document": ["--docs-per-prompt", "3", "--num-docs", "8"],
    "syndication": ["--copies", "3"],
    "multi-turn": ["--turns", "4"],
    "recurring-mix-long": ["--num-docs", "3", "--doc-tokens", "64"],
}


@pytest.mark.parametrize("kind", sorted(GEN_ARGS))
def test_generators_state_true_fractions(kind, cache, tok_dir, tmp_path, capsys):
    out = tmp_path / f"{kind}.jsonl"
    rc, text, err = run_cli(["generate", kind, "--out", out, "--tokenizer", tok_dir, "--num-requests", 24,
                             "--seed", 5, "--quiet", *GEN_ARGS[kind]], capsys)
    assert rc == 0, err
    wl = load_workload(out)
    assert len(wl.requests) == 24
    want = brute_fractions([r.prompt_token_ids for r in wl.requests])
    m = wl.meta
    assert m["prefix_shareable_fraction"] == pytest.approx(want[0], abs=1e-6)
    assert m["run_shareable_fraction"] == pytest.approx(want[1], abs=1e-6)
    assert m["nonprefix_run_shareable_fraction"] == pytest.approx(want[2], abs=1e-6)
    assert m["seed"] == 5 and m["generator"]["kind"] == kind
    assert len(m["tokenizer"]["tokenizer_json_sha256"]) == 64
    # the redundancy each generator is built for
    if kind == "shared-template":
        assert want[0] > 0.15
    elif kind in ("multi-instruction", "syndication", "multi-document"):
        assert want[2] > 0.3
    elif kind == "recurring-mix-long":
        docs = [r.source.split(":")[1] for r in wl.requests]
        popular = {d for d in docs if docs.count(d) > 1}
        assert 1 <= len(popular) <= 3          # only the popular pieces recur
        assert want[2] > 0.15
    else:
        sessions = {r.session_id for r in wl.requests}
        assert len(sessions) == 6 and None not in sessions
        by = {}
        for r in wl.requests:  # each turn's prompt extends its session's previous one
            if r.session_id in by:
                prev = by[r.session_id]
                assert r.extra["turn"] == prev.extra["turn"] + 1
                assert len(r.prompt_token_ids) > len(prev.prompt_token_ids)
            by[r.session_id] = r
        assert want[0] > 0.3
    # same seed -> same file
    out2 = tmp_path / f"{kind}-2.jsonl"
    run_cli(["generate", kind, "--out", out2, "--tokenizer", tok_dir, "--num-requests", 24, "--seed", 5,
             "--quiet", *GEN_ARGS[kind]], capsys)
    assert out.read_text() == out2.read_text()


def test_generate_filters_and_arrivals(cache, tok_dir, tmp_path, capsys):
    out = tmp_path / "w.jsonl"
    rc, _, err = run_cli(["generate", "shared-template", "--out", out, "--tokenizer", tok_dir,
                          "--num-requests", 20, "--template-tokens", 64, "--max-model-len", 260,
                          "--request-rate", 4, "--quiet"], capsys)
    assert rc == 0, err
    wl = load_workload(out)
    assert all(len(r.prompt_token_ids) + r.output_len < 260 for r in wl.requests)
    assert wl.meta["filters"]["max_model_len"] == 260
    times = [r.arrival_time for r in wl.requests]
    assert all(t is not None for t in times) and times == sorted(times)


def test_generator_bad_parameter(cache, tok_dir, tmp_path, capsys):
    rc, _, err = run_cli(["generate", "multi-document", "--out", tmp_path / "x.jsonl", "--tokenizer", tok_dir,
                          "--num-docs", 3, "--docs-per-prompt", 4], capsys)
    assert rc == 2 and "--docs-per-prompt" in err


def test_recurring_mix_long_runs_out_of_documents(cache, tok_dir, tmp_path, capsys):
    rc, _, err = run_cli(["generate", "recurring-mix-long", "--out", tmp_path / "x.jsonl",
                          "--tokenizer", tok_dir, "--num-requests", 5000, "--doc-tokens", 64,
                          "--num-docs", 3, "--recurring", 0.1], capsys)
    assert rc == 2 and "--doc-tokens" in err and "not enough" in err


# ---------------------------------------------------------------- real datasets from local files

def _alpaca_rows(rng):
    return [{"instruction": _sentence(rng, 8), "input": _sentence(rng, 5) if i % 2 else "",
             "output": _sentence(rng, 12)} for i in range(10)]


def test_prepare_real_datasets_from_local_files(tmp_path, tok_dir, capsys, monkeypatch):
    monkeypatch.setenv("KVDEDUP_CACHE", str(tmp_path / "cache"))
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(2)
    alpaca = tmp_path / "alpaca_data.json"
    alpaca.write_text(json.dumps(_alpaca_rows(rng)))
    dolly = tmp_path / "databricks-dolly-15k.jsonl"
    cats = ["closed_qa", "open_qa", "general_qa", "brainstorming", "summarization"]
    dolly.write_text("\n".join(json.dumps({"instruction": _sentence(rng, 6), "context": _sentence(rng, 9),
                                           "response": _sentence(rng, 7), "category": cats[i % 5]})
                               for i in range(10)))
    cnn = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist([{"article": _article(rng), "highlights": _sentence(rng, 10),
                                          "id": f"id{i}"} for i in range(6)]), cnn)
    share = tmp_path / "ShareGPT_V3_unfiltered.json"
    convs = [{"id": f"c{i}", "conversations": [
        {"from": "human" if k % 2 == 0 else "gpt", "value": _sentence(rng, 7)} for k in range(2 + 2 * (i % 3))]}
        for i in range(6)]
    convs.append({"id": "bad-order", "conversations": [{"from": "gpt", "value": "hello there"}]})
    share.write_text(json.dumps(convs))

    def prep(name, path, *extra):
        out = tmp_path / f"{name}.jsonl"
        rc, _, err = run_cli(["prepare", name, "--data-files", path, "--out", out, "--tokenizer", tok_dir,
                              "--quiet", *extra], capsys)
        assert rc == 0, err
        return load_workload(out)

    wl = prep("alpaca", alpaca)
    assert len(wl.requests) == 10 and wl.meta["kind"] == "real"
    from experiments.workloads.tokenize import load_tokenizer

    tok = load_tokenizer(tok_dir)
    rows = json.loads(alpaca.read_text())
    assert wl.requests[1].prompt_token_ids == tok.encode(rows[1]["instruction"] + "\n\n" + rows[1]["input"])
    assert wl.requests[0].output_len == len(tok.encode(rows[0]["output"], add_special_tokens=False))
    assert len(prep("dolly-qa", dolly).requests) == 6  # 3 of 5 categories contain "qa"
    assert len(prep("cnn_dailymail", cnn).requests) == 6
    assert len(prep("sharegpt", share).requests) == 6
    chat = prep("sharegpt-chat", share)
    assert len(chat.requests) == 2 * 1 + 2 * 2 + 2 * 3
    s = [r for r in chat.requests if r.session_id == "sharegpt:c2"]
    assert [r.extra["turn"] for r in s] == [0, 1, 2]
    assert s[1].prompt_token_ids[:len(s[0].prompt_token_ids) - 3] == s[0].prompt_token_ids[:-3]
    # sampling and the study's filter
    wl = prep("cnn_dailymail", cnn, "--num-requests", 3, "--seed", 1)
    assert len(wl.requests) == 3 and wl.meta["sampling"]["num_requests"] == 3
    wl = prep("alpaca", alpaca, "--max-model-len", 30)
    assert all(len(r.prompt_token_ids) + r.output_len < 30 for r in wl.requests)
    assert wl.meta["filters"]["dropped"]
    # second run is served from the cache
    rc, _, err = run_cli(["prepare", "alpaca", "--data-files", alpaca, "--out", tmp_path / "again.jsonl",
                          "--tokenizer", tok_dir, "--quiet"], capsys)
    assert rc == 0 and "from cache" in err
    assert len(load_workload(tmp_path / "again.jsonl").requests) == 10


@pytest.mark.parametrize("content,needle", [
    ('{"instruction": "a", "input": "", "output": "b"}\n{"instruction": "a", "inp', "line2: bad JSON"),
    ('{"instruction": "a", "input": "", "output": "b"}\n{"instruction": "a", "input": ""}', "line2: missing field 'output'"),
    ('{"instruction": 5, "input": "", "output": "b"}', "line1: field 'instruction' must be a string"),
    ("", "empty"),
])
def test_prepare_bad_local_rows(tmp_path, tok_dir, capsys, content, needle, monkeypatch):
    monkeypatch.setenv("KVDEDUP_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "alpaca.jsonl"
    f.write_text(content)
    rc, _, err = run_cli(["prepare", "alpaca", "--data-files", f, "--out", tmp_path / "o.jsonl",
                          "--tokenizer", tok_dir, "--quiet"], capsys)
    assert rc == 2 and needle in err and str(f) in err and "Traceback" not in err


def test_prepare_unknown_name_and_missing_file(tmp_path, tok_dir, capsys):
    rc, _, err = run_cli(["prepare", "nosuch", "--out", tmp_path / "o.jsonl", "--tokenizer", tok_dir], capsys)
    assert rc == 2 and "unknown dataset 'nosuch'" in err
    rc, _, err = run_cli(["prepare", "alpaca", "--data-files", tmp_path / "missing.json", "--out",
                          tmp_path / "o.jsonl", "--tokenizer", tok_dir], capsys)
    assert rc == 2 and "missing.json" in err
    rc, _, err = run_cli(["show", tmp_path / "missing.jsonl"], capsys)
    assert rc == 2 and "no such workload file" in err


# ---------------------------------------------------------------- the study's pickles

def test_pickles_pairs_and_chat(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KVDEDUP_CACHE", str(tmp_path / "cache"))
    pairs = [([1, 2, 3], [4, 5]), (np.array([6, 7]), [8]), ([9] * 10, [1] * 10)]
    pp = tmp_path / "pairs.pkl"
    pp.write_bytes(pickle.dumps(pairs))
    out = tmp_path / "p.jsonl"
    rc, _, err = run_cli(["prepare", "alpaca", "--pickle", pp, "--out", out, "--max-model-len", 15,
                          "--quiet"], capsys)
    assert rc == 0, err
    wl = load_workload(out)
    assert [(r.prompt_token_ids, r.output_len) for r in wl.requests] == [([1, 2, 3], 2), ([6, 7], 1)]
    assert wl.meta["dataset"]["pickle_format"] == "pairs"

    chat = [[("human", [1, 2]), ("gpt", [3, 4, 5]), ("human", [6]), ("gpt", [7, 8])], [("human", [9]), ("gpt", [10])]]
    cp = tmp_path / "chat.pkl"
    cp.write_bytes(pickle.dumps(chat))
    units, prov = load_pickle_units(cp)
    assert prov["pickle_format"] == "chat"
    flat = [(r.prompt, r.output, r.session_id) for u in units for r in u]
    assert flat[0][:2] == ([1, 2], 3) and flat[1][:2] == ([1, 2, 3, 4, 5, 6], 2) and flat[2][:2] == ([9], 1)
    assert flat[0][2] == flat[1][2] != flat[2][2]

    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps([([1, 2], [3]), ([1, "x"], [3])]))
    with pytest.raises(WorkloadError, match=r"bad.pkl:row1:input: token \[1\]"):
        load_pickle_units(bad)
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps([(Path("x"), [1])]))
    with pytest.raises(WorkloadError, match="refusing"):
        load_pickle_units(evil)
    (tmp_path / "empty.pkl").write_bytes(pickle.dumps([]))
    with pytest.raises(WorkloadError, match="empty"):
        load_pickle_units(tmp_path / "empty.pkl")


# ---------------------------------------------------------------- stand-in parsers and prepare

def test_standin_parsers(tmp_path):
    st = make_standin_cache(tmp_path)
    news = parse_lee_cor(st / "gensim-4.4.0/gensim/test/test_data/lee_background.cor")
    assert len(news) == 30 and news[0][0] == 1
    arts = parse_wiki_dump(next((st / "gensim-4.4.0").rglob("*.bz2")))
    assert [a.title for a in arts] == [f"Topic{i}" for i in range(6)]  # no redirect, no ns 4
    text = arts[0].text
    assert "subject of study" in text and "History" in text and "the site" in text
    for junk in ("{{", "[[", "<ref", "citation", "References section", "caption", "'''"):
        assert junk not in text
    ins = parse_alpaca_eval(st / "alpaca-eval-0.6.6/example/outputs.json")
    assert len(ins) == 12
    dia = parse_chatterbot(sorted((st / "chatterbot-corpus-1.3.3").rglob("*.yml")))
    assert len(dia) == 16  # the string quirk is skipped

    bad = tmp_path / "bad.yml"
    bad.write_text("conversations: [[a, b]\n")
    with pytest.raises(WorkloadError, match="bad.yml"):
        parse_chatterbot([bad])
    (tmp_path / "x.json").write_text('[{"instruction": "a"}, {"output": "b"}]')
    with pytest.raises(WorkloadError, match=r"x.json:row1"):
        parse_alpaca_eval(tmp_path / "x.json")
    (tmp_path / "e.cor").write_text("\n\n")
    with pytest.raises(WorkloadError, match="empty"):
        parse_lee_cor(tmp_path / "e.cor")
    with bz2.open(tmp_path / "w.xml.bz2", "wt") as f:
        f.write("<mediawiki><page><title>x</title>")
    with pytest.raises(WorkloadError, match="w.xml.bz2"):
        parse_wiki_dump(tmp_path / "w.xml.bz2")
    assert clean_wikitext("{{a|{{b}}}}Plain text that is long enough to be a paragraph here.") == [
        ("", ["Plain text that is long enough to be a paragraph here."])]


@pytest.mark.parametrize("name", ["standin-summarization", "standin-generation", "standin-conversation",
                                  "standin-qa", "standin-wiki-long"])
def test_prepare_standins(name, cache, tok_dir, tmp_path, capsys):
    out = tmp_path / f"{name}.jsonl"
    rc, text, err = run_cli(["prepare", name, "--out", out, "--tokenizer", tok_dir, "--quiet"], capsys)
    assert rc == 0, err
    wl = load_workload(out)
    dist = wl.meta["output_len_distribution"]
    assert dist["mean"] > 0 and "source" in dist
    if name == "standin-conversation":
        assert any(r.session_id for r in wl.requests) and dist["name"] == "sharegpt"
        assert len({r.session_id for r in wl.requests}) == 16  # 15 + 1 dialogues, quirk skipped
    expected = {"standin-summarization": 30, "standin-generation": 12, "standin-wiki-long": 6}
    if name in expected:
        assert len(wl.requests) == expected[name]


def test_cli_module_entry_point(tmp_path):
    """``python -m experiments.workloads``: list works; bad input -> exit 2, no traceback."""
    env_py = sys.executable
    r = subprocess.run([env_py, "-m", "experiments.workloads", "list"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and "shared-template" in r.stdout and "standin-qa" in r.stdout
    (tmp_path / "bad.jsonl").write_text("not json\n")
    r = subprocess.run([env_py, "-m", "experiments.workloads", "show", str(tmp_path / "bad.jsonl")],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "bad.jsonl:1" in r.stderr
    assert "Traceback" not in r.stderr
    assert meta_path(tmp_path / "a.jsonl").name == "a.jsonl.meta.json"
