"""The `wwt` command: serve the app, run a worker, complete from the shell, benchmark, make a tiny model."""

from __future__ import annotations

import argparse
import json
import sys

from model import settings


def _add_model_args(p: argparse.ArgumentParser, default_model: bool = True) -> None:
    p.add_argument("--backend", choices=["local", "celery"], default=settings.get("WWT_BACKEND"),
                   help="local: engine in this process (default); celery: through Redis and workers")
    p.add_argument("--redis-url", default=settings.get("WWT_REDIS_URL"), help="Redis URL for the celery backend")
    p.add_argument("--device", default=settings.get("WWT_DEVICE") or None, help="cpu, cuda or cuda:N")
    _add_dtype_arg(p)


def _add_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default=settings.get("WWT_DTYPE") or None,
                   help="precision of models whose spec names none (gpt2@int8 names one): float32, bfloat16, "
                        "float16, int8, int4 or nf4; default float16 on CUDA, float32 on CPU")


def cmd_make_tiny_model(args) -> int:
    from model.network.tiny import make_tiny_model

    heads = [h for h in (args.heads or "").split(",") if h]
    out = make_tiny_model(args.dir, model_type=args.model_type, seed=args.seed, heads=heads)
    print(f"wrote a tiny random {args.model_type} checkpoint to {out}")
    return 0


def cmd_complete(args) -> int:
    from model.errors import OPERATOR, WWTError
    from model.types import CompletionRequest

    from .backends import make_backend
    from .app_config import AppConfig

    try:
        config = AppConfig.from_settings([args.model], backend=args.backend, redis_url=args.redis_url,
                                         device=args.device, dtype=args.dtype)
        backend = make_backend(config)
        request = CompletionRequest(text=args.text, model=backend.default_model(), n=args.num,
                                    max_new_tokens=args.max_new_tokens, greedy=args.greedy,
                                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                    seed=args.seed, stop="auto" if args.stop_auto else None)
        result = backend.complete(request, timeout=args.timeout)
    except WWTError as e:
        print(f"error: {e.text_for(OPERATOR)}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
    else:
        for i, s in enumerate(result.suggestions, 1):
            print(f"{i}. {args.text}{s.text}")
        t = result.timings
        print(f"[{result.model}: {t.total_ms:.0f} ms, {t.tokens_prefilled} prefilled, {t.tokens_reused} reused, "
              f"{t.tokens_decoded} decoded, {t.source}]", file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    from .server import serve

    return serve(args)


def cmd_worker(args) -> int:
    from workers.worker import run_worker

    return run_worker(args)


def cmd_loadtest(rest: list) -> int:
    """The HTTP load generator (app/bench/load.py), or with --workers the scale-out run (app/bench/scaleout.py);
    each parses its own options."""
    if any(a == "--workers" or a.startswith("--workers=") for a in rest):
        from .bench.scaleout import main as scaleout
        return scaleout(rest)
    from .bench.load import main as load
    return load(rest)


def cmd_soak(rest: list) -> int:
    """The distributed stack under mixed traffic, a worker killed and Redis restarted (app/bench/soak.py)."""
    from .bench.soak import main as soak

    return soak(rest)


def cmd_bench(args) -> int:
    if args.sizes or args.shape:  # every size at several precisions instead of the usual sections
        from .bench.sizes import run_sizes

        return run_sizes(args)
    from .bench.speed import run_bench

    return run_bench(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wwt", description="Write With Transformer")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny-model", help="write a tiny random checkpoint in the Hub's layout")
    p.add_argument("dir")
    p.add_argument("--model-type", choices=["gpt2", "openai-gpt"], default="gpt2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heads", default="", help="extra heads, comma-separated: sequence-classification,"
                                               "question-answering,token-classification,double-heads")
    p.set_defaults(func=cmd_make_tiny_model)

    p = sub.add_parser("complete", help="print continuations of TEXT")
    p.add_argument("text")
    p.add_argument("--model", default=(settings.model_specs() or ["gpt2"])[0])
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--num", type=int, default=3)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop-auto", action="store_true", help="stop at the end of a sentence or line")
    p.add_argument("--timeout", type=float, default=settings.get_float("WWT_REQUEST_TIMEOUT"))
    p.add_argument("--json", action="store_true", help="print one JSON object with suggestions and timings")
    _add_model_args(p)
    p.set_defaults(func=cmd_complete)

    p = sub.add_parser("serve", help="start the web app")
    p.add_argument("--model", action="append", default=None,
                   help="a model to offer (repeatable; the first is the default)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    _add_model_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="start a Celery worker serving one model")
    p.add_argument("--model", required=True)
    p.add_argument("--concurrency", type=int, default=settings.get_int("WWT_CONCURRENCY"),
                   help="tasks one worker runs at once (threads sharing its one engine)")
    p.add_argument("--redis-url", default=settings.get("WWT_REDIS_URL"))
    p.add_argument("--device", default=settings.get("WWT_DEVICE") or None)
    p.add_argument("--slots", type=int, default=settings.get_int("WWT_SLOTS", default=None),
                   help="shorthand: N rows and a KV cache of N x context positions for the worker's engine")
    _add_dtype_arg(p)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("bench", help="benchmark the engine against the reference implementation")
    p.add_argument("--quick", action="store_true", help="fewer repeats and shorter documents")
    p.add_argument("--json", action="store_true")
    p.add_argument("--only", default="", help="comma-separated sections to run")
    p.add_argument("--redis-url", default=None, help="also measure the queue path against this Redis")
    p.add_argument("--dtype", default=None, help="quantized precisions to measure (comma-separated, default "
                                                 "int8,int4; float32 and the reference are always measured; "
                                                 "with --sizes: the precisions, default float32,int8,int4)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--checkpoint", default=None, help="a GPT-2 checkpoint folder to measure (default: random "
                                                      "weights of gpt2's size, made for the run)")
    from .bench.sizes import add_sizes_arguments  # the standard library only: no torch at parse time

    add_sizes_arguments(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("loadtest", add_help=False,
                       help="open-loop load: `wwt loadtest [--rates 2,10 ...]` on the app's HTTP API, "
                            "`wwt loadtest --workers 1,3 [...]` many writers over Celery workers; --help for each")
    p.set_defaults(func=lambda _args: cmd_loadtest([]))
    p = sub.add_parser("soak", add_help=False,
                       help="the distributed stack for minutes under mixed traffic, a worker SIGKILLed and Redis "
                            "restarted: every request answered once, no shared document lost (--help for options)")
    p.set_defaults(func=lambda _args: cmd_soak([]))
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["loadtest"]:  # its options belong to the load generators (argparse would take them)
        return cmd_loadtest(argv[1:])
    if argv[:1] == ["soak"]:
        return cmd_soak(argv[1:])
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except settings.SettingError as e:  # a WWT_* variable that cannot be used: say which, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
