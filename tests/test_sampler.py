"""Sampler: greedy is argmax, filters never leak, seeds are batch-independent, penalties and logprobs as defined."""

from __future__ import annotations

import math

import pytest
import torch

from llmserve.ops.exponential_noise import exponential_noise
from llmserve.sampling_params import SamplingParams
from llmserve.worker.request_state import RequestState
from llmserve.worker.sampler import Sampler, apply_penalties

V = 50


def make_row(prompt=(1, 2, 3), output=(), **params) -> RequestState:
    """The runner's real per-request state, as the sampler gets it."""
    return RequestState("r", list(prompt), list(output), SamplingParams(**params), block_ids=[], num_computed_tokens=0)


def random_logits(rows: int, vocab: int = V, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax_and_ties_pick_lowest_id():
    logits = random_logits(8)
    logits[3, [7, 11, 30]] = 100.0  # a three-way tie
    out = Sampler()(logits, [make_row(temperature=0.0) for _ in range(8)])
    assert out.token_ids.dtype == torch.int64
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))
    assert out.token_ids[3] == 7
    assert out.logprobs is None and out.top_token_ids is None


def test_all_greedy_batch_draws_no_random_numbers():
    state = torch.get_rng_state()
    Sampler()(random_logits(4), [make_row(temperature=0.0) for _ in range(4)])
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("params", [dict(temperature=0.0), dict(top_k=1, temperature=1.5),
                                    dict(top_p=1e-6, temperature=1.0), dict(min_p=1.0, temperature=2.0)])
def test_degenerate_random_settings_equal_greedy(params):
    logits = random_logits(16, seed=1)
    sampler = Sampler()
    for _ in range(5):
        out = sampler(logits, [make_row(**params) for _ in range(16)])
        assert torch.equal(out.token_ids, logits.argmax(dim=-1))


def test_greedy_rows_stay_argmax_inside_a_random_batch():
    logits = random_logits(10, seed=2)
    rows = [make_row(temperature=0.0 if i % 2 else 1.0) for i in range(10)]
    out = Sampler()(logits, rows)
    assert torch.equal(out.token_ids[1::2], logits.argmax(dim=-1)[1::2])


def test_input_logits_are_not_modified():
    logits = random_logits(3)
    before = logits.clone()
    rows = [make_row(repetition_penalty=1.3, presence_penalty=0.5, output=[4, 4], min_tokens=5, stop_token_ids=[2],
                     top_k=5, top_p=0.8, min_p=0.1) for _ in range(3)]
    Sampler(eos_token_ids=[0])(logits, rows)
    assert torch.equal(logits, before)


def _run_seeded(steps, batch_others, seed=1234):
    """Tokens of one seeded row over `steps` steps, with `batch_others` random rows around it."""
    target = make_row(seed=seed, temperature=0.9, top_p=0.95)
    sampler, tokens = Sampler(), []
    for step in range(steps):
        others = [make_row(seed=step * 7 + i if i % 2 else None, temperature=1.3, top_k=10)
                  for i in range(batch_others)]
        rows = others[:batch_others // 2] + [target] + others[batch_others // 2:]
        logits = torch.cat([random_logits(batch_others // 2, seed=100 + step), random_logits(1, seed=step),
                            random_logits(batch_others - batch_others // 2, seed=200 + step)])
        tokens.append(int(sampler(logits, rows).token_ids[batch_others // 2]))
        target.output_token_ids.append(tokens[-1])
    return tokens


def test_seeded_row_samples_the_same_alone_or_in_any_batch():
    alone = _run_seeded(12, 0)
    assert _run_seeded(12, 5) == alone
    assert _run_seeded(12, 9) == alone
    assert _run_seeded(12, 0, seed=99) != alone


def test_seeded_rows_leave_the_global_generator_alone():
    state = torch.get_rng_state()
    Sampler()(random_logits(3), [make_row(seed=i, temperature=1.0, top_p=0.9) for i in range(3)])
    assert torch.equal(state, torch.get_rng_state())


def test_a_seeded_token_depends_on_its_output_position_not_on_the_earlier_tokens():
    # what a preempted and recomputed request relies on: the same seed at the same position draws the same
    logits = random_logits(1, vocab=1000, seed=4).repeat(3, 1)
    rows = [make_row(seed=5, temperature=1.0, output=[7, 8]), make_row(seed=5, temperature=1.0, output=[1, 2]),
            make_row(seed=5, temperature=1.0, output=[7, 8, 9])]
    first, again = (Sampler()(logits, rows).token_ids.tolist() for _ in range(2))
    assert first == again and first[0] == first[1]
    positions = [Sampler()(logits[:1], [make_row(seed=5, temperature=1.0, output=[0] * n)]).token_ids.item()
                 for n in range(8)]
    assert len(set(positions)) > 4, "each output position draws anew"


def test_noise_is_exp1_and_each_row_a_function_of_its_key_alone():
    keys = torch.tensor([3, -7, 2**62, 3 + 1])
    noise = exponential_noise(keys, 50_000)  # [4, V]
    assert noise.dtype == torch.float32 and bool((noise > 0).all()) and bool(noise.isfinite().all())
    assert torch.equal(exponential_noise(keys[1:2], 50_000), noise[1:2]), "a row is the same alone"
    # Exp(1): mean 1, P(E > 1) = 1/e; 200k draws put both within ~0.005 at 2 sigma
    assert abs(noise.mean().item() - 1.0) < 0.01
    assert abs((noise > 1.0).float().mean().item() - math.exp(-1)) < 0.005
    # neighbouring keys give unrelated rows
    assert abs(torch.corrcoef(noise[[0, 3]])[0, 1].item()) < 0.02


@pytest.mark.parametrize("params,allowed", [
    (dict(top_k=3), {0, 1, 2}),
    (dict(top_p=0.7), {0, 1}),  # 0.45 + 0.30 reaches p
    (dict(top_p=0.8), {0, 1, 2}),
    (dict(min_p=0.3), {0, 1, 2}),  # prob >= 0.3 * 0.45 = 0.135
    (dict(top_k=4, min_p=0.5), {0, 1}),
])
def test_filters_never_pick_outside_the_allowed_set(params, allowed):
    probs = torch.tensor([0.45, 0.30, 0.15, 0.05, 0.03, 0.02])
    logits = probs.log().repeat(4000, 1)
    torch.manual_seed(0)
    picked = set(Sampler()(logits, [make_row(**params) for _ in range(4000)]).token_ids.tolist())
    assert picked == allowed


def test_filters_use_each_rows_own_settings():
    probs = torch.tensor([0.45, 0.30, 0.15, 0.05, 0.03, 0.02])
    logits = probs.log()[torch.tensor([5, 4, 3, 2, 1, 0])].repeat(2000, 1)  # best id is 5
    rows = [make_row(top_k=1 + i % 2) for i in range(2000)]
    torch.manual_seed(0)
    tokens = Sampler()(logits, rows).token_ids
    assert set(tokens[0::2].tolist()) == {5} and set(tokens[1::2].tolist()) == {5, 4}


def test_seeded_frequencies_match_softmax_over_temperature():
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.0, -1.0, 0.5]])
    temperature, draws = 0.7, 3000
    row = make_row(seed=7, temperature=temperature)
    sampler = Sampler()
    for _ in range(draws):  # one long seeded generation: each output position draws anew
        row.output_token_ids.append(int(sampler(logits, [row]).token_ids[0]))
    tokens = torch.tensor(row.output_token_ids)
    observed = torch.bincount(tokens, minlength=6).double()
    expected = torch.softmax(logits[0].double() / temperature, dim=-1) * draws
    chi_square = float(((observed - expected) ** 2 / expected).sum())
    assert chi_square < 20.5  # 5 degrees of freedom, p = 0.001


def test_unseeded_batch_frequencies_match_top_k_renormalised():
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0]).repeat(5000, 1)
    torch.manual_seed(3)
    tokens = Sampler()(logits, [make_row(top_k=3, temperature=1.0) for _ in range(5000)]).token_ids
    observed = torch.bincount(tokens, minlength=5).double()
    kept = torch.tensor([0, 1, 4])
    expected = torch.zeros(5, dtype=torch.float64)
    expected[kept] = torch.softmax(logits[0, kept].double(), dim=-1) * 5000
    assert observed[[2, 3]].sum() == 0
    assert float(((observed[kept] - expected[kept]) ** 2 / expected[kept]).sum()) < 13.8  # 2 dof, p = 0.001


def _penalty_reference(logits, row):
    """Loop-by-loop HF repetition + OpenAI presence/frequency penalties."""
    out, p = logits.clone(), row.params
    for t in set(row.prompt_token_ids + row.output_token_ids):
        out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    for t in set(row.output_token_ids):
        out[t] -= p.presence_penalty + p.frequency_penalty * row.output_token_ids.count(t)
    return out


def test_penalties_match_reference_definitions():
    logits = random_logits(4, vocab=12, seed=5)
    rows = [make_row(prompt=[1, 2, 2], output=[3, 3, 3, 1], repetition_penalty=1.7),
            make_row(prompt=[1, 2], output=[5, 5, 6], presence_penalty=0.6, frequency_penalty=0.25),
            make_row(prompt=[0, 11], output=[11, 4, 4], repetition_penalty=0.8, presence_penalty=-0.5,
                     frequency_penalty=1.5),
            make_row(prompt=[7], output=[7, 8])]
    got = apply_penalties(logits, rows)
    for i, row in enumerate(rows):
        torch.testing.assert_close(got[i], _penalty_reference(logits[i], row))


def test_repetition_penalty_flips_greedy_choice_both_signs():
    logits = torch.tensor([[2.0, 1.9, -5.0], [-5.0, -1.0, -1.2]])
    rows = [make_row(prompt=[0], temperature=0.0, repetition_penalty=1.5),  # 2.0 -> 1.33 < 1.9
            make_row(prompt=[0], output=[1], temperature=0.0, repetition_penalty=1.5)]  # -1.0 -> -1.5 < -1.2
    assert Sampler()(logits, rows).token_ids.tolist() == [1, 2]


def test_presence_and_frequency_count_output_tokens_only():
    logits = torch.tensor([[3.0, 2.5, 0.0]] * 3)
    rows = [make_row(prompt=[0, 0, 0], temperature=0.0, frequency_penalty=2.0),  # prompt ids: no effect
            make_row(output=[0], temperature=0.0, presence_penalty=0.6),  # 3.0 -> 2.4 < 2.5
            make_row(output=[1, 1], temperature=0.0, frequency_penalty=-0.3)]  # 2.5 -> 3.1 > 3.0
    assert Sampler()(logits, rows).token_ids.tolist() == [0, 1, 1]


def test_min_tokens_hides_eos_and_stop_ids_until_reached():
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0]] * 4)  # EOS = 1, stop id = 2
    rows = [make_row(output=[3], min_tokens=2, stop_token_ids=[2], temperature=0.0),
            make_row(output=[3, 3], min_tokens=2, stop_token_ids=[2], temperature=0.0),
            make_row(output=[], min_tokens=1, ignore_eos=True, temperature=0.0),
            make_row(output=[], min_tokens=1, stop_token_ids=[2], seed=0)]
    out = Sampler(eos_token_ids=[1])(logits, rows)
    assert out.token_ids[:3].tolist() == [3, 1, 1]
    assert out.token_ids[3] not in (1, 2)


def test_logprobs_are_raw_log_softmax_with_sorted_top_k():
    logits = random_logits(4, seed=9).to(torch.bfloat16)
    rows = [make_row(logprobs=3, repetition_penalty=2.0, prompt=list(range(V)), temperature=0.0),
            make_row(temperature=1.0),  # asks nothing: still gets values, the runner drops them
            make_row(logprobs=0, temperature=0.5, top_k=4),
            make_row(logprobs=1, seed=3, presence_penalty=1.0, output=[0, 1])]
    out = Sampler()(logits, rows)
    raw = torch.log_softmax(logits.float(), dim=-1)
    assert out.logprobs.dtype == torch.float32 and out.top_token_ids.shape == (4, 3)
    torch.testing.assert_close(out.logprobs, raw.gather(1, out.token_ids[:, None]).squeeze(1))
    torch.testing.assert_close(out.top_logprobs, raw.gather(1, out.top_token_ids))
    assert torch.all(out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:])
    torch.testing.assert_close(out.top_logprobs, raw.topk(3, dim=-1).values)


def test_logprobs_zero_gives_chosen_only():
    out = Sampler()(random_logits(2), [make_row(logprobs=0, temperature=0.0), make_row()])
    assert out.logprobs is not None and out.top_token_ids is None and out.top_logprobs is None


def _mixed_cuda_rows(seeded_only=False):
    seeded = make_row(output=[3, 3, 9], seed=5, temperature=0.8, top_k=40, top_p=0.9, min_p=0.01,
                      repetition_penalty=1.2, frequency_penalty=0.3, min_tokens=4, stop_token_ids=[7], logprobs=2)
    if seeded_only:
        return [seeded]
    return [make_row(temperature=0.0),
            make_row(output=[1], temperature=0.0, presence_penalty=1.0, logprobs=5),
            seeded,
            make_row(temperature=1.1, top_p=0.5)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sampling_never_syncs_and_seeds_are_batch_independent():
    logits = random_logits(4, vocab=1000, seed=11).to("cuda", torch.bfloat16)
    rows, sampler = _mixed_cuda_rows(), Sampler(eos_token_ids=[0])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = sampler(logits, rows)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.token_ids.device.type == "cuda" and out.top_token_ids.shape == (4, 5)
    assert int(out.token_ids[0]) == int(logits[0].float().argmax())
    alone = sampler(logits[2:3], _mixed_cuda_rows(seeded_only=True))
    assert int(alone.token_ids[0]) == int(out.token_ids[2])


def test_a_uniform_draw_of_exactly_zero_never_picks_an_improbable_token(monkeypatch):
    # float32 uniforms are exactly 0 once in 2^24 draws: over a 49k vocabulary that happened about
    # once every 340 sampled tokens, and -log(1 - u) = 0 then made a token of probability e^-80 win
    logits = torch.zeros(1, 1000)
    logits[0, 7] = 80.0  # the only sensible token; every other one has probability ~1.8e-35
    real_rand_like = torch.rand_like

    def rand_with_a_zero(like, *args, **kwargs):
        u = real_rand_like(like, *args, **kwargs)
        u[:, 123] = 0.0  # the draw for an improbable token
        return u

    monkeypatch.setattr(torch, "rand_like", rand_with_a_zero)
    tokens = Sampler()(logits, [make_row(temperature=1.0)]).token_ids
    assert tokens.tolist() == [7]


def test_exponential_draws_are_positive_at_both_ends_of_the_uniform_range():
    from llmserve.worker.sampler import exponential_from_uniform

    noise = exponential_from_uniform(torch.tensor([0.0, 0.5, 1.0 - 2.0 ** -24]))
    assert noise[0] == math.inf and bool((noise > 0).all())
    assert noise[1].item() == pytest.approx(math.log(2))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_logit_bias_forces_bans_and_leaves_other_rows_alone(device):
    logits = random_logits(4).to(device)
    best = logits.argmax(dim=-1).tolist()
    forced, banned = (best[0] + 7) % V, best[1]
    rows = [make_row(temperature=0.0, logit_bias={forced: 100.0}),
            make_row(temperature=0.0, logit_bias={banned: -100.0}),
            make_row(temperature=0.0),
            make_row(temperature=1.0, seed=3, logit_bias={forced: 100.0, V + 5: 50.0})]  # an id past V: ignored
    out = Sampler()(logits, rows)
    picked = out.token_ids.tolist()
    assert picked[0] == forced and picked[3] == forced
    assert picked[1] != banned and picked[1] == logits[1].clone().index_fill_(0, torch.tensor([banned], device=device),
                                                                              float("-inf")).argmax().item()
    assert picked[2] == best[2]


def test_logit_bias_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"logit_bias values must be in \[-100, 100\]"):
        SamplingParams(logit_bias={3: 100.5})
    with pytest.raises(ValueError, match="logit_bias keys"):
        SamplingParams(logit_bias={-1: 1.0})


def _key_whose_first_draw_hashes_to(target: int) -> int:
    """The seeded key whose noise element 0 has SplitMix64 output `target` (the finaliser inverted)."""
    from llmserve.ops.exponential_noise import GOLDEN, MASK64, MIX1, MIX2, signed64

    def unshift(z: int, bits: int) -> int:  # inverse of z ^ (z >> bits)
        result = z
        for _ in range(64 // bits + 1):
            result = z ^ (result >> bits)
        return result & MASK64

    z = unshift(target, 31)
    z = (z * pow(MIX2, -1, 1 << 64)) & MASK64
    z = unshift(z, 27)
    z = (z * pow(MIX1, -1, 1 << 64)) & MASK64
    z = unshift(z, 30)
    return signed64(z - GOLDEN)  # element 0 hashes key + 1 * GOLDEN


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_seeded_noise_is_never_zero_even_for_the_largest_hash(device):
    """The largest hash once gave u = 1.0 in float32 and noise 0, so that token won the race even at
    probability 0 (0 / 0 = nan): a random token in ~0.3% of seeded steps once tokens were filtered."""
    keys = torch.tensor([_key_whose_first_draw_hashes_to(2**64 - 1), _key_whose_first_draw_hashes_to(0)],
                        device=device)
    noise = exponential_noise(keys, 1)[:, 0].cpu()
    assert torch.isfinite(noise).all() and (noise > 0).all(), noise
    probs = torch.tensor([[0.0, 1.0]], device=device)  # a filtered token and the only allowed one
    race = probs / torch.stack([exponential_noise(keys[:1], 1)[0, 0], torch.tensor(1.0, device=device)])
    assert race.argmax().item() == 1
