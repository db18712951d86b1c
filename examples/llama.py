"""Generate with a Llama-family model running MoBA attention (transformers backend).

In the spirit of the original MoBA release's examples/llama.py:

    python examples/llama.py --model /path/to/llama --attn moba --block-size 4096 --top-k 12

Without --model it builds a tiny randomly initialized Llama (no download), so
the script runs anywhere in seconds, CPU included:

    python examples/llama.py --attn moba --block-size 32 --top-k 3 --prompt-len 256

It prints the prefill time, the generation time and the generated tokens.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

import moba


def tiny_llama() -> LlamaForCausalLM:
    """A 2-layer Llama with random weights: head_dim 64, GQA (4 query heads, 2 kv heads)."""
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=8192,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def load(args: argparse.Namespace) -> PreTrainedModel:
    if args.model is None:
        model = tiny_llama()
        model.set_attn_implementation(args.attn)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            args.model, dtype="auto", attn_implementation=args.attn
        )
    return model.to(args.device).eval()


def prompt_ids(args: argparse.Namespace, model: PreTrainedModel) -> torch.Tensor:
    if args.model is not None and args.prompt is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        return tokenizer(args.prompt, return_tensors="pt").input_ids.to(args.device)
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(1, model.config.vocab_size, (1, args.prompt_len), generator=generator)
    return ids.to(args.device)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="model path (default: a tiny random Llama)")
    parser.add_argument("--attn", default="moba", choices=["moba", "moba_naive", "sdpa"])
    parser.add_argument("--block-size", type=int, default=64, help="MoBA block (chunk) size")
    parser.add_argument("--top-k", type=int, default=3, help="blocks per query, own block included")
    parser.add_argument(
        "--full-attention-layers",
        type=int,
        nargs="*",
        default=[],
        help="layers kept on full attention (negative counts from the end, e.g. -3 -2 -1)",
    )
    parser.add_argument(
        "--decode", default="full", choices=["full", "moba"], help="attention of decode steps"
    )
    parser.add_argument(
        "--prompt-len", type=int, default=256, help="random prompt length (tiny model)"
    )
    parser.add_argument("--prompt", default=None, help="prompt text (with --model)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument(
        "--device",
        default="cuda" if moba.backend_available("cuda") else "cpu",
        help="default: cuda when moba was built with its CUDA backend and a GPU is present",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    moba.register(
        block_size=args.block_size,
        top_k=args.top_k,
        full_attention_layers=args.full_attention_layers,
        decode=args.decode,
    )
    model = load(args)
    ids = prompt_ids(args, model)
    mask = torch.ones_like(ids)
    print(
        f"model: {args.model or 'tiny random Llama'}, attn: {args.attn}, "
        f"block size {args.block_size}, top-k {args.top_k}, prompt {ids.shape[1]} tokens, "
        f"device {args.device}, native CUDA backend: {moba.backend_available('cuda')}"
    )

    with torch.inference_mode():
        # A short warm-up so that one-time costs do not count as prefill.
        model(ids[:, :8], attention_mask=mask[:, :8])
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(ids, attention_mask=mask)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        prefill = time.perf_counter() - start

        start = time.perf_counter()
        tokens = model.generate(
            ids, attention_mask=mask, max_new_tokens=args.max_new_tokens, do_sample=False
        )
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        generate = time.perf_counter() - start

    new = tokens[0, ids.shape[1] :].tolist()
    print(f"prefill: {prefill * 1e3:.1f} ms")
    print(
        f"generate ({len(new)} new tokens, prefill included): {generate * 1e3:.1f} ms, "
        f"{len(new) / generate:.1f} tokens/s"
    )
    print(f"generated ids: {new}")
    if args.model is not None and args.prompt is not None:
        from transformers import AutoTokenizer

        print(AutoTokenizer.from_pretrained(args.model).decode(tokens[0]))


if __name__ == "__main__":
    main()
