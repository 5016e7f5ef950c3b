"""Shared mode on a real vLLM engine (tiny model): borrowed runs give exact outputs from
an identical context, hold fewer blocks, leak none, and keep tenants and the exact prefix
cache clean.

Engines, one alive at a time: stock APC-off for reference outputs; shared with APC off
and k=0 (borrows from identical contexts); shared with APC on and k=32.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.engine

B = 32
TINY = dict(model="tiny", max_model_len=768, enforce_eager=True, seed=0)


def _tokens(seed, n):
    return np.random.default_rng(seed).integers(3, 2000, size=n).tolist()


def _greedy(llm, prompts, max_tokens=16, salts=None):
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    reqs = [{"prompt_token_ids": p, **({"cache_salt": s} if s else {})}
            for p, s in zip(prompts, salts or [None] * len(prompts))]
    outs = llm.generate(reqs, sp, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _stats(llm):
    import vllm_ext

    return vllm_ext.dedup_stats(llm)


def _delta(s1, s0, key):
    return s1.get(key, 0) - s0.get(key, 0)


P, D = _tokens(1, 40), _tokens(2, 400)
A = P + D + _tokens(4, 10)
SAME_CONTEXT = [P + D + _tokens(10 + i, 12) for i in range(6)]
MIXED = [_tokens(60, 300), _tokens(61, 120)]          # share nothing with A
LONG_TAIL = P + D + _tokens(90, 200)   # borrows D, then computes 200 tokens in one row
SHIFTED = _tokens(91, 23) + D + _tokens(92, 200)     # borrows D 17 positions earlier


@pytest.fixture(scope="module")
def reference(engines):
    """Greedy outputs of stock vLLM (APC off) for every prompt the exact tests use."""
    llm = engines.get("stock-noapc", **TINY, num_gpu_blocks_override=80, dedup="off",
                      enable_prefix_caching=False)
    prompts = [A, *SAME_CONTEXT, *MIXED, LONG_TAIL]
    return {tuple(p): o for p, o in zip(prompts, _greedy(llm, prompts, max_tokens=LONG))}


LONG = 128  # reference tokens; a test compares the first max_tokens of them


def _ref(reference, prompts, n=48):
    return [reference[tuple(p)][:n] for p in prompts]


def _shared_k0(engines, blocks=30):
    # 30 blocks: two 452-token SAME_CONTEXT requests (15 blocks each, 11 of them
    # borrowed) fit together with the source; four do not without borrowing.
    return engines.get(f"shared-k0-{blocks}", **TINY, num_gpu_blocks_override=blocks,
                       dedup="shared", enable_prefix_caching=False, dedup_options={"k": 0})


def test_run_borrowed_from_identical_context_gives_the_exact_output(engines, reference):
    llm = _shared_k0(engines)
    assert _greedy(llm, [A]) == _ref(reference, [A], 16)
    s0 = _stats(llm)
    out = _greedy(llm, [SAME_CONTEXT[0]])
    s1 = _stats(llm)
    assert _delta(s1, s0, "borrowed_runs") >= 1
    assert _delta(s1, s0, "borrowed_tokens") >= 320          # 10+ whole blocks of D
    # the run starts and ends mid-block: its edge positions are read from the source
    # into the reader's own edge blocks (slot edges, the default), none is computed
    assert _delta(s1, s0, "shared_edge_slots") > 0 and _delta(s1, s0, "shared_edge_tokens") == 0
    assert out == _ref(reference, SAME_CONTEXT[:1], 16)
    assert s1["physical_blocks"] == 0 and s1["held_source_blocks"] == 0


def test_block_edges_borrow_whole_blocks_and_compute_the_edges_exactly(engines, reference):
    """``edges=block``: the same borrows rounded inwards to whole reader blocks; the edge
    tokens are computed, and outputs stay exact."""
    llm = engines.get("shared-k0-block", **TINY, num_gpu_blocks_override=80, dedup="shared",
                      enable_prefix_caching=False, dedup_options={"k": 0, "edges": "block"})
    _greedy(llm, [A], max_tokens=1)
    s0 = _stats(llm)
    outs = _greedy(llm, SAME_CONTEXT[:3], max_tokens=48)
    s1 = _stats(llm)
    assert outs == _ref(reference, SAME_CONTEXT[:3])
    assert _delta(s1, s0, "borrowed_runs") >= 3 and _delta(s1, s0, "borrowed_tokens") % B == 0
    assert _delta(s1, s0, "shared_edge_tokens") > 0 and _delta(s1, s0, "shared_edge_slots") == 0
    assert s1["physical_blocks"] == 0 and s1["held_source_blocks"] == 0


def test_concurrent_borrowers_hold_one_copy_and_release_it(engines, reference):
    llm = _shared_k0(engines, blocks=80)
    _greedy(llm, [A], max_tokens=1)
    s0 = _stats(llm)
    outs = _greedy(llm, SAME_CONTEXT, max_tokens=48)
    s1 = _stats(llm)
    assert outs == _ref(reference, SAME_CONTEXT)
    assert _delta(s1, s0, "borrowed_runs") >= 6
    assert s1["peak_physical_blocks"] < 0.7 * s1["peak_logical_blocks"]
    assert s1["physical_blocks"] == 0 and s1["held_source_blocks"] == 0


def test_peak_physical_blocks_match_the_audit_prediction(engines, tmp_path):
    """Documents after different instructions, all requests resident: the engine holds
    each document once, and the audit's shared rule predicts its peak within 10%."""
    from analysis.audit import audit_workload

    rng = np.random.default_rng(5)
    docs = [_tokens(940 + i, 360) for i in range(2)]   # chunk boundaries resync early
    prompts = [_tokens(200 + i, int(rng.integers(10, 90))) + docs[i % 2] + _tokens(300 + i, 9)
               for i in range(8)]
    path = tmp_path / "w.jsonl"
    path.write_text("".join(
        f'{{"prompt_token_ids": {p}, "output_len": 24, "arrival_time": 0.0, '
        f'"session_id": "s{i}", "source": "test"}}\n' for i, p in enumerate(prompts)))
    predicted = audit_workload(path, [B], concurrency=8)["per_block_size"][str(B)]
    llm = engines.get("shared-apc-fresh", **TINY, num_gpu_blocks_override=200, dedup="shared",
                      dedup_options={"k": 32})
    _greedy(llm, prompts[:2], max_tokens=24)             # the two sources, computed first
    _greedy(llm, prompts, max_tokens=24)                 # all eight at once
    s = _stats(llm)
    sim = predicted["simulation"]["shared"]
    assert s["borrowed_runs"] == predicted["shared"]["borrowed_runs"] == 6
    assert s["borrowed_tokens"] == predicted["shared"]["borrowed_tokens"]
    assert s["peak_physical_blocks"] < 0.75 * s["peak_logical_blocks"]
    assert abs(s["peak_physical_blocks"] - sim["peak_physical_blocks"]) <= \
        0.1 * sim["peak_physical_blocks"]
    assert s["physical_blocks"] == 0 and s["held_source_blocks"] == 0


def test_borrowers_and_plain_requests_in_one_batch(engines, reference):
    """Decode steps mix borrower rows (kvdedup's kernel) with plain rows (the stock
    kernel on a sub-batch), in the order vLLM's model runner puts them."""
    llm = _shared_k0(engines, blocks=80)
    _greedy(llm, [A], max_tokens=1)
    prompts = [MIXED[0], SAME_CONTEXT[2], MIXED[1], SAME_CONTEXT[3]]
    outs = _greedy(llm, prompts, max_tokens=48)
    assert outs == _ref(reference, prompts)


def test_prefill_sized_borrower_rows_through_vllms_kernel(engines, reference, monkeypatch):
    """Borrower rows with many query tokens run vLLM's kernel over a scratch copy of
    their context, borrowed keys re-rotated (``vllm_ext.dense``). With the threshold at 1
    every borrower row, decode rows too, takes that path: outputs from an identical
    context stay those of full prefill, and a run borrowed 17 positions earlier (delta
    != 0, misaligned) gives what the borrowed kernel gives."""
    prompts = [SHIFTED, LONG_TAIL, SAME_CONTEXT[4], MIXED[0]]
    outs = {}
    monkeypatch.setenv("KVDEDUP_STRICT_KERNELS", "1")   # a failing path raises, no oracle
    for min_q in ("1000000", "1"):
        monkeypatch.setenv("KVDEDUP_DENSE_MIN_QUERY_TOKENS", min_q)
        llm = engines.get(f"shared-k0-dense-{min_q}", **TINY, num_gpu_blocks_override=80,
                          dedup="shared", enable_prefix_caching=False,
                          dedup_options={"k": 0})
        _greedy(llm, [A], max_tokens=1)
        s0 = _stats(llm)
        outs[min_q] = _greedy(llm, prompts, max_tokens=48)
        assert _delta(_stats(llm), s0, "borrowed_runs") >= 3
    assert outs["1"][1:] == _ref(reference, prompts[1:])
    assert outs["1"] == outs["1000000"]


def test_failing_kernel_paths_fall_back_to_the_oracle(engines, reference, monkeypatch):
    """Both borrowed-attention paths raise (injected fault) on every call: the engine keeps
    serving, and the torch oracle computes the borrower rows, so outputs from an identical
    context stay those of full prefill."""
    monkeypatch.setenv("KVDEDUP_FAIL_KERNELS", "dense,kernel")
    llm = engines.get("shared-k0-failing", **TINY, num_gpu_blocks_override=80,
                      dedup="shared", enable_prefix_caching=False, dedup_options={"k": 0})
    _greedy(llm, [A], max_tokens=1)
    s0 = _stats(llm)
    prompts = [LONG_TAIL, SAME_CONTEXT[5], MIXED[1]]
    assert _greedy(llm, prompts, max_tokens=48) == _ref(reference, prompts)
    assert _delta(_stats(llm), s0, "borrowed_runs") >= 2


def test_borrowers_are_admitted_on_the_blocks_they_own(engines, reference):
    """vLLM admits a request only if its whole prompt fits in the free blocks. A borrower
    owns no block over its borrowed range, so it is admitted next to its running source
    even where the pool could not hold a second full copy: with 28 usable blocks and the
    source holding 15-16 while it decodes 48 tokens, two followers (15-16 logical blocks,
    4-5 of their own) run beside it, and the three finish in about 50 steps. Under vLLM's
    own gate each follower waits for 15 free blocks, i.e. for the source to finish: about
    100 steps."""
    llm = _shared_k0(engines, blocks=29)
    prompts = [A, *SAME_CONTEXT[:2]]
    s0 = _stats(llm)
    outs = _greedy(llm, prompts, max_tokens=48)
    s1 = _stats(llm)
    assert outs == _ref(reference, prompts)
    assert _delta(s1, s0, "borrowed_runs") == 2
    assert _delta(s1, s0, "step") < 70, "followers waited for a full prompt's free blocks"
    assert s1["physical_blocks"] == 0 and s1["held_source_blocks"] == 0


def test_preemption_of_borrowers_completes_exactly_and_leaks_nothing(engines, reference):
    # Admission promises each running request one block of decode growth; outputs of 128
    # tokens need four, so decode outgrows the 30-block pool and preempts.
    llm = _shared_k0(engines, blocks=30)
    s0 = _stats(llm)
    outs = _greedy(llm, SAME_CONTEXT, max_tokens=LONG)
    s1 = _stats(llm)
    assert _delta(s1, s0, "preemptions") > 0, "30 blocks did not force preemption"
    assert _delta(s1, s0, "borrowed_runs") > 0
    assert outs == _ref(reference, SAME_CONTEXT, LONG)
    assert s1["physical_blocks"] == 0 and s1["held_source_blocks"] == 0


def _shared_apc(engines):
    return engines.get("shared-apc", **TINY, num_gpu_blocks_override=160, dedup="shared",
                       dedup_options={"k": 32})


def test_tenants_never_borrow_from_each_other(engines):
    llm = _shared_apc(engines)
    doc = _tokens(70, 400)
    _greedy(llm, [_tokens(71, 30) + doc + [5]], salts=["tenant-a"])
    s0 = _stats(llm)
    _greedy(llm, [_tokens(72, 45) + doc + [6]], salts=["tenant-b"])
    s1 = _stats(llm)
    assert _delta(s1, s0, "borrowed_runs") == 0
    _greedy(llm, [_tokens(73, 45) + doc + [6]], salts=["tenant-a"])
    assert _delta(_stats(llm), s1, "borrowed_runs") >= 1


def test_borrowed_and_later_blocks_never_enter_the_prefix_cache(engines):
    llm = _shared_apc(engines)
    from dedup.hashing import chunk_runs

    doc, p2 = _tokens(80, 400), _tokens(81, 70)
    src = _tokens(82, 40) + doc + [5]
    _greedy(llm, [src])
    s0 = _stats(llm)
    borrower = p2 + doc + _tokens(83, 10)
    _greedy(llm, [borrower])                         # borrows the document
    s1 = _stats(llm)
    assert _delta(s1, s0, "borrowed_runs") >= 1
    # A request sharing the borrower's prompt up to the middle of the document may only
    # hit blocks before the borrower's first borrowed block (run start + k, rounded up).
    stored = {ch.digest for ch in chunk_runs(src)}
    run_start = next(ch.start for ch in chunk_runs(borrower) if ch.digest in stored)
    exact = -(-(run_start + 32) // B) * B
    e = p2 + doc[:250] + _tokens(84, 10)
    _greedy(llm, [e])
    s2 = _stats(llm)
    hit = _delta(s2, s1, "prefix_hits")
    assert len(p2) // B * B <= hit <= exact < (len(p2) + 250) // B * B
    assert s2["physical_blocks"] == 0 and s2["held_source_blocks"] == 0
