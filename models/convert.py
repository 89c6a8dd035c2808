"""Build Hugging Face checkpoints for export: from a GGUF file, or a tiny random Llama.

Runs in its own process (``python -m kvcrush_ov.models.convert ...``) so the heavy export stack
(torch, transformers, gguf) is loaded only while converting and its memory is released after.
Needs the ``export`` extra.

SmolLM2's GGUF has a GPT-2 byte-level BPE vocabulary (``tokenizer.ggml.pre == "smollm"``) on a
Llama architecture; transformers builds a wrong SentencePiece-style tokenizer from it, so
:func:`smollm_tokenizer` rebuilds the right one from the GGUF fields.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _field(reader, key: str):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def smollm_tokenizer(gguf_path: Path):
    """Byte-level BPE tokenizer rebuilt from the GGUF's ``tokenizer.ggml.*`` fields."""
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    reader = gguf.GGUFReader(str(gguf_path))
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens")
    merges: list[str] = _field(reader, "tokenizer.ggml.merges")
    types: list[int] = _field(reader, "tokenizer.ggml.token_type")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    bpe = models.BPE(
        vocab=vocab,
        merges=[tuple(m.split(" ", 1)) for m in merges],
        fuse_unk=False,
        byte_fallback=False,
    )
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    control = int(gguf.TokenType.CONTROL)
    specials = [AddedToken(t, special=True, normalized=False)
                for t, ty in zip(tokens, types, strict=True) if ty == control]
    tok.add_special_tokens(specials)

    def name(key: str) -> str | None:
        idx = _field(reader, key)
        return None if idx is None else tokens[int(idx)]

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=name("tokenizer.ggml.bos_token_id"),
        eos_token=name("tokenizer.ggml.eos_token_id"),
        unk_token=name("tokenizer.ggml.unknown_token_id"),
        pad_token=name("tokenizer.ggml.padding_token_id"),
        clean_up_tokenization_spaces=False,
    )
    template = _field(reader, "tokenizer.chat_template")
    if template:
        fast.chat_template = template
    return fast


def gguf_to_hf(gguf_path: Path, out_dir: Path, tokenizer_repair: str | None) -> None:
    """Dequantize ``gguf_path`` into a plain fp32 Hugging Face checkpoint in ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    # The checkpoint we save is plain weights: drop the GGUF quantization record.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out_dir))
    if tokenizer_repair == "smollm":
        tokenizer = smollm_tokenizer(gguf_path)
    elif tokenizer_repair is None:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    else:
        raise ValueError(f"tokenizer_repair={tokenizer_repair!r} is unknown")
    tokenizer.save_pretrained(str(out_dir))
    _fix_generation_config(out_dir, tokenizer)


def _fix_generation_config(out_dir: Path, tokenizer) -> None:
    """Make generation_config.json name the tokenizer's eos/bos/pad ids (GenAI reads them)."""
    path = out_dir / "generation_config.json"
    cfg = json.loads(path.read_text()) if path.exists() else {}
    for key, tok_attr in (
        ("eos_token_id", "eos_token_id"),
        ("bos_token_id", "bos_token_id"),
        ("pad_token_id", "pad_token_id"),
    ):
        val = getattr(tokenizer, tok_attr, None)
        if val is not None:
            cfg[key] = val
    path.write_text(json.dumps(cfg, indent=2))


def _training_text() -> list[str]:
    """Deterministic English-ish text from the standard library's docstrings (no download)."""
    import importlib
    import inspect

    texts = []
    for mod_name in ("json", "pathlib", "argparse", "collections", "functools", "itertools", "os",
                     "re", "shutil", "subprocess", "textwrap", "typing", "unittest", "zipfile"):
        mod = importlib.import_module(mod_name)
        for _, obj in inspect.getmembers(mod):
            doc = inspect.getdoc(obj)
            if doc:
                texts.append(doc)
    return texts


def tiny_random_llama(out_dir: Path, seed: int = 0) -> None:
    """A random Llama (hidden 256, 4 layers, 8 q / 2 kv heads) with a locally trained BPE."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=2048,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sorted(_training_text()), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHATML_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(str(out_dir))
    fast.save_pretrained(str(out_dir))
    _fix_generation_config(out_dir, fast)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvcrush_ov.models.convert")
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gguf")
    g.add_argument("gguf", type=Path)
    g.add_argument("out", type=Path)
    g.add_argument("--tokenizer-repair", default=None)
    r = sub.add_parser("random-llama")
    r.add_argument("out", type=Path)
    r.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.cmd == "gguf":
        gguf_to_hf(args.gguf, args.out, args.tokenizer_repair)
    else:
        tiny_random_llama(args.out, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
