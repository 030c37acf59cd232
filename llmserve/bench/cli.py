"""`llmserve bench serve` and `llmserve bench compare`."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import math
import platform
import socket
import sys

from llmserve.bench import compare, datasets, report
from llmserve.bench.client import EndpointConfig
from llmserve.bench.load import LoadConfig, RunResult, run_load, run_sweep
from llmserve.bench.metrics import parse_slo, summarize


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
    p.add_argument("--model", required=True)
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    p.add_argument("--dataset", choices=["random", "chat", "jsonl", "workload-c"], default="random")
    p.add_argument("--dataset-path", default=None, help="jsonl file for --dataset jsonl")
    p.add_argument("--num-prompts", type=int, default=None, help="default: 512 random, all of the others")
    p.add_argument("--input-len-min", type=int, default=256)
    p.add_argument("--input-len-max", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="local tokenizer directory (transformers)")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--concurrency", type=int, default=None)
    shape.add_argument("--request-rate", type=float, default=None, help="requests/s (Poisson or gamma)")
    shape.add_argument("--sweep-rates", default=None, help="comma-separated rates, one run each")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1 is Poisson")
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=None)
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--slo", default="ttft=500ms,tpot=50ms")
    p.add_argument("--api-key", default=None)
    p.add_argument("--out", default=None, help="JSON result file")
    p.add_argument("--html", default=None, help="HTML report file")
    p.add_argument("--label", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_serve)


def load_tokenizer(path: str | None):
    if path is None:
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def build_dataset(args: argparse.Namespace, tokenizer) -> list[datasets.BenchRequest]:
    if args.dataset == "random":
        items = datasets.random_dataset(args.num_prompts or 512, (args.input_len_min, args.input_len_max),
                                        args.output_len, args.seed, tokenizer, args.endpoint)
    elif args.dataset == "workload-c":
        items = datasets.workload_c_prompts()
    elif args.dataset == "chat":
        items = datasets.chat_dataset(seed=args.seed)
    else:
        assert args.dataset_path, "--dataset jsonl needs --dataset-path"
        items = datasets.jsonl_dataset(args.dataset_path)
    return items[:args.num_prompts] if args.num_prompts else items


def run_to_dict(run: RunResult, slo: dict) -> dict:
    """One run as stored in the result file: aggregates, client overhead, every record."""
    return {"offered_rate": "inf" if math.isinf(run.offered_rate) else run.offered_rate,
            "concurrency": run.concurrency, "wall_seconds": run.wall_seconds, "num_cancelled": run.num_cancelled,
            "client_overhead": {"cpu_fraction": run.client_cpu_fraction,
                                "mean_chunk_us": run.mean_chunk_seconds * 1e6},
            "aggregates": summarize(run.records, slo),
            "records": [dataclasses.asdict(r) for r in run.records]}


def environment() -> dict:
    return {"host": socket.gethostname(), "python": platform.python_version(), "platform": platform.platform(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


async def execute(args: argparse.Namespace) -> list[RunResult]:
    """Run the load shape the flags ask for."""
    tokenizer = load_tokenizer(args.tokenizer)
    requests = build_dataset(args, tokenizer)
    endpoint = EndpointConfig(args.base_url, args.model, args.endpoint, args.api_key, args.temperature,
                              args.ignore_eos, args.request_timeout)
    rate = args.request_rate if args.request_rate is not None else math.inf
    load = LoadConfig(rate, args.burstiness, args.concurrency, args.warmup, args.max_seconds, args.seed,
                      not args.no_progress)
    if args.sweep_rates:
        rates = [float(x) for x in args.sweep_rates.split(",") if x.strip()]
        return await run_sweep(requests, endpoint, rates, load, tokenizer)
    return [await run_load(requests, endpoint, load, tokenizer)]


def cmd_serve(args: argparse.Namespace) -> int:
    slo = parse_slo(args.slo)
    runs = asyncio.run(execute(args))
    config = {k: v for k, v in vars(args).items() if k not in ("func", "api_key") and not callable(v)}
    result = {"label": args.label or args.model, "config": config, "environment": environment(),
              "runs": [run_to_dict(run, slo) for run in runs]}
    print(summary_text(result))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    if args.html:
        report.write_html(result, args.html)
    return 0 if any(run["aggregates"]["num_successful"] for run in result["runs"]) else 1


def summary_text(result: dict) -> str:
    """A short table: one row per run, latencies in ms."""
    headers = ["rate", "conc", "ok/total", "req/s", "out tok/s", "goodput", "TTFT p50", "TTFT p99", "TPOT p50",
               "ITL p50", "ITL p99", "errors", "client cpu"]
    rows = []
    for run in result["runs"]:
        a = run["aggregates"]
        rows.append([str(run["offered_rate"]), str(run["concurrency"] or "-"),
                     f"{a['num_successful']}/{a['num_requests']}", report.fmt(a["request_throughput"]),
                     report.fmt(a["output_throughput"], 1), report.fmt(a["goodput"]),
                     report.fmt_ms(a["ttft"]["p50"]), report.fmt_ms(a["ttft"]["p99"]),
                     report.fmt_ms(a["tpot"]["p50"]), report.fmt_ms(a["itl"]["p50"]), report.fmt_ms(a["itl"]["p99"]),
                     ",".join(f"{k}:{v}" for k, v in a["errors_by_kind"].items()) or "0",
                     f"{run['client_overhead']['cpu_fraction']:.0%}"])
    return compare.format_text(headers, rows)


def cmd_compare(args: argparse.Namespace) -> int:
    results = compare.load_results(args.results)
    print(compare.format_text(*compare.compare_rows(results)))
    if args.html:
        compare.write_html(results, args.html)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m llmserve.bench serve|compare ...`."""
    parser = argparse.ArgumentParser(prog="llmserve")
    add_bench_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)
