"""Compress once, ask many: a chat on one long document whose KV cache is compressed after the
first turn and reused by the next ones (each turn computes only its new tokens):
python samples/chat.py [--model NAME] [--budget 0.25] [--importance kvzip]."""

import argparse

import kvcrush_ov as kv
from kvcrush_ov.demo import build_prompt

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="SmolLM2-135M-Instruct", help="name or folder")
parser.add_argument("--budget", type=float, default=0.25, help="cache kept, share of the prompt")
parser.add_argument("--importance", default="snapkv", help="snapkv (the default) or kvzip, ...")
args = parser.parse_args()

pipe = kv.Pipeline(args.model, eviction=kv.CacheEvictionConfig(max_cache_size=args.budget,
                                                               importance=args.importance))
pipe.start_chat("You answer questions about the document the user gives.")
document = build_prompt().rsplit("\n\nQuestion:", 1)[0]  # the demo's essays, without a question
turns = [document + "\n\nWhat is this document about? One sentence.",
         "What is the special magic number mentioned in the text?",
         "Who wrote the document?"]
for question in turns:
    out = pipe.generate(question, max_new_tokens=40)
    m = out.metrics[0]
    print(f"> {question[-60:]!r}\n{out.texts[0].strip()}")
    print(f"  [{m.num_input_tokens} tokens, {m.num_cached_tokens} from the cache, TTFT "
          f"{m.ttft_s:.2f} s, KV held {m.kv_bytes / 2**20:.1f} MiB]\n")
pipe.finish_chat()
