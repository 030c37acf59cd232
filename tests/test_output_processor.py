"""OutputProcessor: the core's token ids become text deltas, stop strings end requests, logprobs and
finish reasons are assembled, and requests unknown to it are left alone."""

from __future__ import annotations

from llmserve.core.messages import EngineCoreOutput, EngineCoreOutputs, TokenLogprobs
from llmserve.core.sampled_token import SampledToken
from llmserve.frontend.output_processor import OutputProcessor
from llmserve.sampling_params import SamplingParams
from tests.helpers_tokenizer import tiny_byte_level_tokenizer

TOKENIZER = tiny_byte_level_tokenizer()


def ids_of(text: str) -> list[int]:
    return TOKENIZER.encode(text, add_special_tokens=False)


def run(processor: OutputProcessor, request_id: str, token_ids: list[int], last: EngineCoreOutput | None = None):
    """Feed one token per step, then `last`; returns every delta and every id the processor asked to abort."""
    deltas, stopped = [], []
    steps = [EngineCoreOutput(request_id, [t]) for t in token_ids] + ([last] if last else [])
    for output in steps:
        new, ended = processor.process(EngineCoreOutputs([output]))
        deltas += new
        stopped += ended
    return deltas, stopped


def test_deltas_add_up_to_the_text_and_the_core_finish_reason_is_kept():
    processor = OutputProcessor(TOKENIZER)
    processor.add_request("a", ids_of("Hi"), SamplingParams(max_tokens=8))
    token_ids = ids_of("Hello 😀 world")
    deltas, stopped = run(processor, "a", token_ids[:-1], EngineCoreOutput("a", token_ids[-1:], finish_reason="length",
                                                                          num_cached_tokens=2))
    assert "".join(d.new_text for d in deltas) == "Hello 😀 world" and stopped == []
    last = deltas[-1]
    assert (last.finished, last.finish_reason, last.num_output_tokens, last.num_prompt_tokens,
            last.num_cached_tokens) == (True, "length", len(token_ids), len(ids_of("Hi")), 2)
    assert not any(d.finished for d in deltas[:-1]) and "a" not in processor


def test_a_stop_string_ends_the_request_and_asks_the_core_to_abort_it():
    processor = OutputProcessor(TOKENIZER)
    processor.add_request("a", [], SamplingParams(stop=["ld!"]))
    deltas, stopped = run(processor, "a", ids_of("Hello world! The end"))
    assert "".join(d.new_text for d in deltas) == "Hello wor"
    assert stopped == ["a"] and (deltas[-1].finish_reason, deltas[-1].stop_reason) == ("stop", "ld!")
    assert len(processor) == 0


def test_a_stop_token_id_from_the_core_is_the_stop_reason_and_needs_no_abort():
    processor = OutputProcessor(TOKENIZER)
    processor.add_request("a", [], SamplingParams(stop_token_ids=[7]))
    deltas, stopped = run(processor, "a", ids_of("ok"), EngineCoreOutput("a", [7], finish_reason="stop", stop_reason=7))
    assert stopped == [] and (deltas[-1].finish_reason, deltas[-1].stop_reason) == ("stop", 7)


def test_logprobs_become_sampled_tokens_only_when_asked():
    processor = OutputProcessor(TOKENIZER)
    processor.add_request("with", [], SamplingParams(logprobs=1))
    processor.add_request("without", [], SamplingParams())
    step = EngineCoreOutputs([EngineCoreOutput("with", [5], [TokenLogprobs(-0.5, [(5, -0.5)])]),
                              EngineCoreOutput("without", [6])])
    with_logprobs, without = processor.process(step)[0]
    assert with_logprobs.new_logprobs == [SampledToken(5, -0.5, [(5, -0.5)])]
    assert without.new_logprobs is None and without.new_token_ids == [6]


def test_abort_gives_a_final_delta_once_and_later_outputs_are_ignored():
    processor = OutputProcessor(TOKENIZER)
    processor.add_request("a", [1, 2], SamplingParams())
    run(processor, "a", ids_of("Hi"))
    final = processor.abort("a")
    assert (final.finished, final.finish_reason, final.num_output_tokens, final.num_prompt_tokens) == (
        True, "abort", len(ids_of("Hi")), 2)
    assert processor.abort("a") is None
    assert processor.process(EngineCoreOutputs([EngineCoreOutput("a", [5]), EngineCoreOutput("x", [5])])) == ([], [])


def test_without_a_tokenizer_outputs_carry_token_ids_only():
    processor = OutputProcessor(None)
    processor.add_request("a", [1], SamplingParams(stop=["x"]))
    deltas, stopped = run(processor, "a", [3, 4], EngineCoreOutput("a", [5], finish_reason="length"))
    assert [d.new_token_ids for d in deltas] == [[3], [4], [5]] and all(d.new_text == "" for d in deltas)
    assert stopped == [] and deltas[-1].finish_reason == "length"
