"""`pd-runtime`: the bundled runtime's command line."""

from __future__ import annotations

import argparse
import json
import platform
import sys


def _positive(kind):
    """An argparse type: a number above zero (a zero block or token count would divide by
    zero deep inside the test instead of being refused here)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text} is not above zero")
        return value
    return parse


def _device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.machine()}, {platform.processor() or 'unknown'})"


def transfer_test(args: argparse.Namespace) -> int:
    from .selftest import Cell, pairing_problems, run_cells

    cell = Cell(family=args.family, num_kv_heads=args.kv_heads, head_size=args.head_size,
                layers=args.layers, p_tp=args.p_tp, d_tp=args.d_tp, p_block=args.p_block,
                d_block=args.d_block, p_layout=args.p_layout, d_layout=args.d_layout,
                dtype=args.dtype, tokens=args.tokens,
                requests=args.requests, seed=args.seed, sliding_window=args.sliding_window,
                timeout_s=args.timeout)
    rules = "capabilities" if args.rules == "capabilities" else "compat"
    problems, checker = pairing_problems(cell, rules)
    if problems:
        out = {"result": "rejected", "checker": checker, "rules": problems, "cell": cell.label()}
        if args.output == "json":
            print(json.dumps(out, indent=2))
        else:
            print(f"REJECTED by {checker}: {cell.label()}")
            for p in problems:
                print(f"  - {p}")
        return 2
    if args.output != "json":
        print(f"transfer-test: {cell.label()}, {cell.tokens} tokens x {cell.requests} requests, "
              f"{cell.p_tp} P + {cell.d_tp} D processes on {args.device}", flush=True)
    (res,) = run_cells([cell], args.device)
    res["device_name"] = _device_name(args.device)
    res["checker"] = checker
    res["result"] = "match" if res["ok"] else "mismatch"
    if args.output == "json":
        print(json.dumps(res, indent=2, default=str))
    else:
        for o in res.get("decode", []):
            if o.get("error"):
                print(f"  D rank {o['rank']}: ERROR {o['error']}: {o.get('message')}")
            else:
                print(f"  D rank {o['rank']}: {o['bytes']} bytes from {o['peers']} P rank(s), "
                      f"{o['descriptors']} READ descriptor(s), "
                      f"{o['mismatched_bytes']} mismatched bytes")
        print(f"  bytes moved {res['bytes']}, {res['gbps']:.3f} GB/s end to end, "
              f"{res['read_gbps']:.3f} GB/s READ, leaked {res['leaked']}")
        print("MATCH" if res["ok"] else "MISMATCH")
    return 0 if res["ok"] else 1


def generate_cmd(args: argparse.Namespace) -> int:
    from .engine.checkpoint import CheckpointError
    from .engine.generate import GenerateCommandError, run_generate_command

    try:
        res = run_generate_command(args.model, args.prompt, args.prompt_ids, args.max_tokens,
                                   chat=args.chat, dtype=args.dtype, block_size=args.block_size,
                                   layout=args.layout, cache_dtype=args.kv_cache_dtype,
                                   device=args.device, ignore_eos=args.ignore_eos)
    except (CheckpointError, GenerateCommandError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.output == "json":
        print(json.dumps(res, indent=2))
    else:
        print(res["text"] if res["text"] is not None else " ".join(map(str, res["token_ids"])))
        print(f"[{len(res['token_ids'])} tokens, {res['finish_reason']}, "
              f"{res['tokens_per_s']} tokens/s]", file=sys.stderr)
    return 0


def add_generate_parser(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="offline greedy generation (the engine's reference output)")
    g.add_argument("--model", required=True, help="checkpoint directory (config.json + "
                   "*.safetensors) or a .gguf file")
    g.add_argument("--prompt", help="prompt text (needs the checkpoint's tokenizer)")
    g.add_argument("--prompt-ids", help="prompt token ids, comma-separated (instead of --prompt)")
    g.add_argument("--max-tokens", type=int, default=16)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    g.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="compute and KV dtype (default: the checkpoint's)")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--layout", default="HND", choices=["HND", "NHD", "LBHNC", "LBNHC"])
    g.add_argument("--kv-cache-dtype", default="auto",
                   choices=["auto", "fp8", "fp8_e4m3", "fp8_e5m2"])
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--device", default="cpu")
    g.add_argument("-o", "--output", default="table", choices=["table", "json"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pd-runtime")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("transfer-test", help="move random KV between P and D ranks over NIXL and "
                       "check every byte")
    t.add_argument("--family", default="dense",
                   choices=["dense", "moe", "mla", "sliding", "hybrid-ssm"])
    t.add_argument("--p-tp", type=_positive(int), default=1)
    t.add_argument("--d-tp", type=_positive(int), default=1)
    t.add_argument("--p-block", type=_positive(int), default=16)
    t.add_argument("--d-block", type=_positive(int), default=16)
    t.add_argument("--p-layout", default="HND", choices=["HND", "NHD", "LBHNC", "LBNHC"])
    t.add_argument("--d-layout", default="HND", choices=["HND", "NHD", "LBHNC", "LBNHC"])
    t.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "fp8"])
    t.add_argument("--tokens", type=_positive(int), default=256)
    t.add_argument("--requests", type=_positive(int), default=2)
    t.add_argument("--layers", type=_positive(int), default=4)
    t.add_argument("--kv-heads", type=_positive(int), default=8)
    t.add_argument("--head-size", type=_positive(int), default=64)
    t.add_argument("--sliding-window", type=int, default=100)
    t.add_argument("--seed", type=int, default=1)
    t.add_argument("--timeout", type=_positive(float), default=60.0)
    t.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    t.add_argument("--rules", default="auto", choices=["auto", "compat", "capabilities"],
                   help="which rules decide exit code 2: compat.check_pools (auto, compat) "
                        "or the runtime's own capabilities")
    t.add_argument("-o", "--output", default="table", choices=["table", "json"])
    from .serve.cli import add_arguments as add_serve_arguments  # SERVE

    add_serve_arguments(sub.add_parser("serve", help="serve a model over the OpenAI API "
                                       "(prefill, decode or aggregated)"))
    add_generate_parser(sub)  # MODEL
    args = ap.parse_args(argv)
    if args.cmd == "generate":
        return generate_cmd(args)
    if args.cmd == "serve":
        from .serve.cli import main as serve_main

        return serve_main(args)
    if args.cmd == "transfer-test":
        return transfer_test(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
