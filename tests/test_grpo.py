"""GRPO on CPU (reference backend, a small config): the objective's math against hand-computed
values, the reward parser on good, malformed and adversarial outputs, rollouts, a few end-to-end
steps, and the bad-input errors."""
import json
import math
import random
import time

import pytest
import torch

import model.generate as generation
import model.grpo_rollout as grpo_rollout
from model.arithmetic_task import REWARD_EXACT, REWARD_FORMAT, ArithmeticTask, Problem
from model.checkpoint import save_checkpoint
from model.config import preset
from model.grpo import GRPOConfig, main, run_grpo, update_policy
from model.grpo_loss import (SEQ_MEAN_TOKEN_MEAN, TOKEN_MEAN, aggregate, clipped_policy_loss, group_advantages,
                             grpo_loss, k3_kl)
from model.grpo_rollout import (build_sampler, pack_sequences, rollout, safe_rewards, sync_weights,
                                token_logprobs)
from model.grpo_warmup import WarmupConfig, supervised_warmup, trainable_parameters
from model.model import Linear, random_model

EOS = 257


def small_args(**overrides):
    """Fast on CPU: the tiny preset shrunk (kernel coverage does not matter here)."""
    small = dict(vocab_size=260, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                 num_hidden_layers=2, num_attention_heads=2, q_lora_rank=0, kv_lora_rank=32, qk_nope_head_dim=16,
                 qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, n_group=2,
                 topk_group=1, rope_factor=1.0, max_position_embeddings=64, num_nextn_predict_layers=0)
    return preset("tiny", **{**small, **overrides})


@pytest.fixture
def task():
    return ArithmeticTask(bos_id=256, eos_id=EOS, min_digits=2, max_digits=2)


def weights_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------
# The objective
# ----------------------------------------------------------------------------------------------
def test_group_advantages_hand_values():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0],  # mean 0.25, unbiased std 0.5
                            [0.1, 0.1, 0.1, 0.1],  # all equal: no preference
                            [1.0, 0.1, 1.0, 0.1]])  # mean 0.55, std sqrt(4 * 0.45^2 / 3)
    expected = torch.tensor([[1.5, -0.5, -0.5, -0.5], [0.0, 0.0, 0.0, 0.0],
                             [0.45, -0.45, 0.45, -0.45]])
    expected[2] /= math.sqrt(4 * 0.45 ** 2 / 3)
    torch.testing.assert_close(group_advantages(rewards), expected)


@pytest.mark.parametrize("shape,match", [((0, 4), "empty group"), ((3, 0), "empty group"), ((3, 1), ">= 2"),
                                         ((8,), r"\[prompts, group_size\]")])
def test_group_advantages_errors(shape, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(torch.rand(shape))


def test_clipped_policy_loss_hand_values():
    ratio = torch.tensor([[1.5, 0.5, 0.5, 1.5, 1.1]])
    adv = torch.tensor([1.0])
    old = torch.log(torch.rand(1, 5) * 0.5 + 0.1)
    logp = (old + ratio.log()).requires_grad_(True)
    loss, clipped = clipped_policy_loss(logp, old, adv, 0.2)
    # A > 0: ratio 1.5 is clipped to 1.2 (no gain past it); 0.5 and 1.1 keep their value.
    torch.testing.assert_close(loss, torch.tensor([[-1.2, -0.5, -0.5, -1.2, -1.1]]))
    assert clipped.tolist() == [[True, False, False, True, False]]
    loss.sum().backward()  # clipped tokens get no gradient; others -A * ratio
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.5, -0.5, 0.0, -1.1]]))

    loss, clipped = clipped_policy_loss(logp.detach(), old, -adv, 0.2)
    # A < 0: ratio 0.5 is clipped to 0.8; 1.5 stays (the pessimistic bound).
    torch.testing.assert_close(loss, torch.tensor([[1.5, 0.8, 0.8, 1.5, 1.1]]))
    assert clipped.tolist() == [[False, True, True, False, False]]


def test_k3_kl_hand_values_and_unbiased():
    logp, ref = torch.tensor([math.log(0.5), math.log(0.3)]), torch.tensor([math.log(0.25), math.log(0.3)])
    torch.testing.assert_close(k3_kl(logp, ref), torch.tensor([0.5 - math.log(0.5) - 1, 0.0]))
    # Its mean over samples of p is KL(p || q).
    p, q = torch.softmax(torch.randn(6), 0), torch.softmax(torch.randn(6), 0)
    p, q = p.double(), q.double()
    n = 400_000
    x = torch.multinomial(p, n, replacement=True)
    estimate = k3_kl(p.log()[x], q.log()[x]).mean()
    exact = (p * (p.log() - q.log())).sum()
    per_value = k3_kl(p.log(), q.log())  # k3 of each of the 6 outcomes
    std_error = math.sqrt((p * (per_value - exact) ** 2).sum() / n)
    assert abs(estimate - exact) < 5 * std_error, (estimate, exact, std_error)
    assert (k3_kl(torch.randn(1000), torch.randn(1000)) >= 0).all()


def test_aggregations_hand_values():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    assert aggregate(per_token, mask, TOKEN_MEAN).item() == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert aggregate(per_token, mask, SEQ_MEAN_TOKEN_MEAN).item() == pytest.approx((2 + 4) / 2)
    with pytest.raises(ValueError, match="token-mean"):
        aggregate(per_token, mask, "sum")


def test_grpo_loss_hand_values():
    old = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    logp = torch.log(torch.tensor([[0.75, 0.5], [0.25, 0.5]]))  # ratios 1.5, 1 / 0.5, 1
    ref = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.25]]))
    mask = torch.tensor([[True, True], [True, False]])
    adv = torch.tensor([1.0, 1.0])
    loss, stats = grpo_loss(logp, old, ref, adv, mask, clip_eps=0.2, beta=0.5, mode=TOKEN_MEAN)
    kl = [2 / 3 - math.log(2 / 3) - 1, 0.0, 2 - math.log(2) - 1]  # the three masked tokens
    policy = [-1.2, -1.0, -0.5]
    assert loss.item() == pytest.approx(sum(p + 0.5 * k for p, k in zip(policy, kl)) / 3, rel=1e-5)
    assert stats["kl"] == pytest.approx(sum(kl) / 3, rel=1e-5)
    assert stats["kl_max"] == pytest.approx(max(kl), rel=1e-5)
    assert stats["clip_frac"] == pytest.approx(1 / 3)
    # the largest token, [1, 0], masked out: the next unmasked one, not a masked one ([1, 1]: 0.19)
    _, stats = grpo_loss(logp, old, ref, adv, torch.tensor([[True, True], [False, False]]), 0.2, 0.5, TOKEN_MEAN)
    assert stats["kl_max"] == pytest.approx(kl[0], rel=1e-5)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(logp, old, ref, torch.ones(3), mask)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, old, ref[:, :1], adv, mask)


# ----------------------------------------------------------------------------------------------
# Task and reward
# ----------------------------------------------------------------------------------------------
def ids(text: str, eos: bool = True):
    return list(text.encode("utf-8")) + ([EOS] if eos else [])


def test_reward_good_outputs(task):
    problem = Problem(47, "*", 89)
    assert problem.prompt == "47*89=" and problem.answer == "4183"
    assert task.reward(problem, ids("4183")) == REWARD_EXACT
    assert task.reward(problem, ids("4183") + ids("junk")) == REWARD_EXACT  # after eos: ignored
    assert task.reward(problem, ids("4182")) == REWARD_FORMAT
    assert task.reward(Problem(10, "+", 0), ids("10")) == REWARD_EXACT
    assert task.reward(Problem(0, "*", 12), ids("0")) == REWARD_EXACT


@pytest.mark.parametrize("response", [
    ids("4183", eos=False),  # truncated: no eos
    [EOS], [],  # empty
    ids(" 4183"), ids("4183 "), ids("+4183"), ids("-4183"), ids("04183"), ids("41.83"), ids("4,183"),
    ids("4183=4183"), ids("１２３"), ids("٤١٨٣"),  # fullwidth and Arabic-Indic digits are not ASCII
    ids("9" * 5000),  # longer than any answer (and than Python's int() limit)
    [52, 49, 256, 56, 51, EOS],  # bos inside
    [52, -1, EOS], [52, 10 ** 30, EOS], [52, 49.0, EOS], [52, "1", EOS], [52, None, EOS], [52, True, EOS],
    None, 4183, "4183", b"4183", {"answer": 4183},
])
def test_reward_malformed_and_adversarial(task, response):
    assert task.parse_answer(response) is None
    assert task.reward(Problem(47, "*", 89), response) == 0.0


def test_task_problems(task):
    held = task.held_out(50, seed=3)
    assert held == task.held_out(50, seed=3) and len(set(held)) == 50
    drawn = task.sample(400, random.Random(0), exclude=frozenset(held))
    assert not set(drawn) & set(held)
    assert all(10 <= p.a <= 99 and 10 <= p.b <= 99 and p.op in "+*" for p in drawn)
    assert {p.op for p in drawn} == {"+", "*"}
    assert task.max_answer_digits == 4 and ArithmeticTask(256, EOS, 2, 4).max_answer_digits == 8
    problem = Problem(12, "+", 34)
    assert task.encode_prompt(problem) == [256] + ids("12+34=", eos=False)
    assert task.encode_answer(problem) == ids("46")


@pytest.mark.parametrize("kwargs,match", [({"min_digits": 3, "max_digits": 2}, "min_digits"),
                                          ({"ops": "-"}, "ops"), ({"ops": ""}, "ops"),
                                          ({"eos_id": None}, "eos_id"), ({"bos_id": 65}, "bos_id")])
def test_task_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ArithmeticTask(**{"bos_id": 256, "eos_id": EOS, **kwargs})


def test_safe_rewards_counts_failures():
    def reward(problem, response):
        if response[0] == 0:
            raise RuntimeError("reward bug")
        return {1: float("nan"), 2: "text", 3: 0.5}[response[0]]

    rewards, failures = safe_rewards(reward, [Problem(1, "+", 1)] * 4, [[0], [1], [2], [3]])
    assert rewards == [0.0, 0.0, 0.0, 0.5] and failures == 3


# ----------------------------------------------------------------------------------------------
# Rollouts
# ----------------------------------------------------------------------------------------------
def test_pack_sequences_mask_marks_the_response():
    prompts, responses = [[256, 1, 2], [256, 3]], [[7, 8, EOS], [9]]
    tokens, mask = pack_sequences(prompts, responses, "cpu")
    assert tokens.tolist() == [[256, 1, 2, 7, 8, EOS], [256, 3, 9, 0, 0, 0]]
    assert tokens[:, 1:][mask].tolist() == [7, 8, EOS, 9]


def test_token_logprobs_match_the_model():
    model = random_model(small_args(), seed=1)
    tokens = torch.randint(0, 256, (3, 7))
    logp = token_logprobs(model, tokens, temperature=0.7)
    logits = model(tokens)[0]
    for t in range(6):
        expected = torch.log_softmax(logits[:, t] / 0.7, -1).gather(-1, tokens[:, t + 1, None])[:, 0]
        torch.testing.assert_close(logp[:, t], expected, rtol=1e-4, atol=1e-5)


def test_rollout_is_reproducible_and_grouped(task):
    model = random_model(small_args(), seed=2)
    problems = task.sample(3, random.Random(0))
    a = rollout(model, task, problems, 4, temperature=1.0, seed=7)
    b = rollout(model, task, problems, 4, temperature=1.0, seed=7)
    c = rollout(model, task, problems, 4, temperature=1.0, seed=8)
    assert a.responses == b.responses and a.responses != c.responses
    assert len(a.responses) == 12 and a.tokens.shape[0] == 12 and a.rewards.shape == (12,)
    assert all(1 <= len(r) <= task.max_response_tokens for r in a.responses)
    assert all(EOS not in r[:-1] for r in a.responses)  # cut after the first eos
    assert a.generated_tokens % 12 == 0 and a.tokens_per_s > 0  # every row runs every decode step
    assert 12 * max(len(r) for r in a.responses) <= a.generated_tokens <= 12 * task.max_response_tokens
    prompt = task.encode_prompt(problems[1])  # rows 4..7 are prompt 1's group
    assert all(a.tokens[i, :len(prompt)].tolist() == prompt for i in range(4, 8))


def test_rollout_stops_at_eos_with_the_same_batch(task, monkeypatch):
    """Every response forced to end early (eos at its token 1 or 2): the rollout stops decoding and
    its batch is the one of a rollout decoding to the length limit."""
    model = random_model(small_args(), seed=2)
    problems = task.sample(3, random.Random(0))
    real_decode, calls = generation.decode_one_token, []

    def forcing(model, tokens, cache_seqlens, block_table):
        logits, hidden = real_decode(model, tokens, cache_seqlens, block_table)
        calls.append(None)
        rows = torch.arange(tokens.shape[0]) % 2 + 1 == len(calls)  # row b ends at token b % 2 + 1
        logits[rows, 0, EOS] = 1e9
        return logits, hidden

    monkeypatch.setattr(generation, "decode_one_token", forcing)
    early = rollout(model, task, problems, 4, temperature=1.0, seed=7)
    early_calls = len(calls)
    calls.clear()
    real_generate = grpo_rollout.generate
    monkeypatch.setattr(grpo_rollout, "generate", lambda *args, **kw: real_generate(*args, **{**kw, "eos_id": None}))
    full = rollout(model, task, problems, 4, temperature=1.0, seed=7)
    assert task.max_response_tokens == 5 and len(calls) == 4
    assert early_calls == 3  # all rows hold eos after 3 tokens; the check after 4 stops
    assert early.generated_tokens == 12 * 4 and full.generated_tokens == 12 * 5
    assert early.responses == full.responses and all(r[-1] == EOS and len(r) <= 3 for r in early.responses)
    for name in ("tokens", "mask", "rewards", "correct"):
        assert torch.equal(getattr(early, name), getattr(full, name)), name
    torch.testing.assert_close(token_logprobs(model, early.tokens), token_logprobs(model, full.tokens),
                               rtol=0, atol=0)


def test_rollout_errors(task):
    model = random_model(small_args(max_position_embeddings=8), seed=3)
    problems = task.sample(2, random.Random(0))
    with pytest.raises(ValueError, match="empty"):
        rollout(model, task, [], 4)
    with pytest.raises(ValueError, match="group_size"):
        rollout(model, task, problems, 1)
    with pytest.raises(ValueError, match="temperature"):
        rollout(model, task, problems, 4, temperature=0.0)
    with pytest.raises(ValueError, match="cache"):  # 7 prompt + 5 response tokens > 8 positions
        rollout(model, task, problems, 4)


def test_fp8_sampler_follows_the_policy():
    policy = random_model(small_args(hidden_size=128, moe_intermediate_size=128), seed=4)
    sampler = build_sampler(policy, "reference", fp8=True, dtype="float32")
    linears = [(n, m) for n, m in sampler.named_modules() if isinstance(m, Linear) and m.is_fp8]
    assert linears
    for name, module in linears:
        w = policy.get_submodule(name).weight
        assert (module.dense_weight(torch.float32) - w).abs().max() <= 0.07 * w.abs().max()  # e4m3: 3 mantissa bits
    with torch.no_grad():
        policy.model.norm.weight.add_(1.0)
    sync_weights(policy, sampler)
    torch.testing.assert_close(sampler.model.norm.weight, policy.model.norm.weight)
    with pytest.raises(ValueError, match="float weights"):
        sync_weights(sampler, policy)


def test_update_policy_measures_the_fp8_sampler_gap(task):
    """sampler_gap is the largest |log p_policy - log p_sampler| over response tokens: 0 against the
    policy's own log-probs, > 0 (and the hand-computed value) against an FP8 sampler's."""
    policy = random_model(small_args(hidden_size=128, moe_intermediate_size=128), seed=8)
    params = trainable_parameters(policy)
    batch = rollout(policy, task, task.sample(2, random.Random(8)), 2, seed=8)
    sampler = build_sampler(policy, "reference", fp8=True, dtype="float32")
    with torch.no_grad():
        own, fp8 = token_logprobs(policy, batch.tokens), token_logprobs(sampler, batch.tokens)
    expected = (own - fp8).abs()[batch.mask].max().item()
    assert expected > 0
    advantages, cfg = torch.tensor([1.0, -1.0, 1.0, -1.0]), GRPOConfig(inner_steps=1)
    stats = update_policy(policy, torch.optim.AdamW(params, lr=0.0), params, batch, advantages, own, cfg, own)
    assert stats["sampler_gap"] == 0.0
    stats = update_policy(policy, torch.optim.AdamW(params, lr=0.0), params, batch, advantages, own, cfg, fp8)
    assert stats["sampler_gap"] == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
def even_first_token_prob(model, task):
    """Mean probability of an even first response token over 16 prompts (all 2-digit: one length)."""
    prompts = torch.tensor([task.encode_prompt(p) for p in task.sample(16, random.Random(1))])
    with torch.no_grad():
        probs = torch.softmax(model(prompts)[0][:, -1], dim=-1)  # [16, V]
    return probs[:, 0::2].sum(-1).mean().item()


def test_grpo_steps_learn_the_reward(task):
    policy, reference = random_model(small_args(), seed=5), random_model(small_args(), seed=5)
    sampler = build_sampler(policy, "reference", fp8=False, dtype="float32")
    before, reference_before = weights_of(policy), weights_of(reference)
    even_before = even_first_token_prob(policy, task)

    raised = []

    def reward(problem, response):  # learnable by a random model at once; raises on some samples
        if response[0] % 7 == 0:
            raised.append(response)
            raise ValueError("reward bug")
        return float(response[0] % 2 == 0)

    cfg = GRPOConfig(steps=3, prompts_per_step=4, group_size=8, inner_steps=2, lr=3e-3, eval_every=2)
    logged = []
    history = run_grpo(policy, reference, sampler, task, task.held_out(4, 0), cfg, logged.append, False, reward)
    assert logged == history and [r["step"] for r in history] == [1, 2, 3]
    for key in ("reward", "accuracy", "kl", "clip_frac", "response_len", "rollout_tokens_per_s", "loss"):
        assert all(math.isfinite(r[key]) for r in history), key
    assert [("heldout_acc" in r) for r in history] == [False, True, True]
    assert history[-1]["skipped_steps"] == 0
    assert raised and history[-1]["reward_failures"] == len(raised)
    after = weights_of(policy)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(reference_before[k], v) for k, v in weights_of(reference).items())
    for k, v in weights_of(sampler).items():
        torch.testing.assert_close(v, after[k])
    assert history[-1]["kl"] > 0  # the policy has moved away from the reference
    assert all(r["kl_max"] >= r["kl"] for r in history)
    assert all(r["sampler_gap"] < 1e-5 for r in history)  # a float32 sampler with the policy's weights
    even_after = even_first_token_prob(policy, task)
    assert even_after > even_before + 0.05, (even_before, even_after)  # the advantage's sign is right


def _update_setup(task, seed: int, lr: float):
    """A small policy, its AdamW, one rollout of 2 problems x 2 samples and the policy's own log-probs
    as the reference's: (policy, params, optimizer, batch, ref_logp)."""
    policy = random_model(small_args(), seed=seed)
    params = trainable_parameters(policy)
    optimizer = torch.optim.AdamW(params, lr=lr)
    batch = rollout(policy, task, task.sample(2, random.Random(seed)), 2, seed=seed)
    with torch.no_grad():
        ref_logp = token_logprobs(policy, batch.tokens)
    return policy, params, optimizer, batch, ref_logp


def test_nan_loss_step_is_skipped(task):
    policy, params, optimizer, batch, ref_logp = _update_setup(task, seed=6, lr=1e-3)
    before = weights_of(policy)
    cfg = GRPOConfig(inner_steps=3)
    stats = update_policy(policy, optimizer, params, batch, torch.full((4,), float("nan")), ref_logp, cfg)
    assert stats == {"skipped_steps": 3}
    assert all(torch.equal(before[k], v) for k, v in weights_of(policy).items())
    stats = update_policy(policy, optimizer, params, batch, torch.tensor([1.0, -1.0, 1.0, -1.0]), ref_logp, cfg)
    assert stats["skipped_steps"] == 0 and math.isfinite(stats["loss"])


@pytest.mark.parametrize("kwargs,match", [({"aggregation": "seq-sum"}, "aggregation"),
                                          ({"group_size": 1}, "group_size"), ({"inner_steps": 0}, "inner_steps"),
                                          ({"clip_eps": 0.0}, "clip_eps"), ({"beta": -0.1}, "beta"),
                                          ({"temperature": 0.0}, "temperature")])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GRPOConfig(**kwargs)


def test_supervised_warmup_lowers_the_loss(task):
    policy = random_model(small_args(), seed=7)
    sampler = build_sampler(policy, "reference", fp8=False, dtype="float32")
    cfg = WarmupConfig(lr=3e-3, batch_size=16, max_steps=24, eval_every=12, target_accuracy=2.0)
    accuracy, history = supervised_warmup(policy, sampler, task, task.held_out(8, 0), cfg, log=lambda s: None)
    assert [h["step"] for h in history] == [12, 24] and 0.0 <= accuracy <= 1.0
    assert history[1]["loss"] < history[0]["loss"]


def test_cli_run_writes_log_plot_and_checkpoint(tmp_path):
    save_checkpoint(random_model(small_args(), seed=8), tmp_path / "init")
    out = tmp_path / "run"
    main(["--out", str(out), "--init", str(tmp_path / "init"), "--device", "cpu", "--max-digits", "2",
          "--steps", "2", "--prompts-per-step", "2", "--group-size", "2", "--eval-size", "4", "--eval-every", "1"])
    lines = [json.loads(line) for line in (out / "grpo_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2] and all("heldout_acc" in r for r in lines)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_heldout_acc"] == lines[-1]["heldout_acc"]
    assert (out / "grpo_curves.png").stat().st_size > 0 and (out / "policy" / "config.json").exists()


def test_deadline_ends_grpo_and_warmup_after_one_evaluated_step(task):
    policy, reference = random_model(small_args(), seed=9), random_model(small_args(), seed=9)
    sampler = build_sampler(policy, "reference", fp8=False, dtype="float32")
    held_out, past = task.held_out(4, 0), time.monotonic() - 1.0
    cfg = GRPOConfig(steps=5, prompts_per_step=2, group_size=2, eval_every=10)
    history = run_grpo(policy, reference, sampler, task, held_out, cfg, progress=False, deadline=past)
    assert [r["step"] for r in history] == [1] and "heldout_acc" in history[0]
    warm = WarmupConfig(batch_size=4, max_steps=50, eval_every=20, target_accuracy=2.0)
    logged = []
    _, evaluations = supervised_warmup(policy, sampler, task, held_out, warm, log=logged.append, deadline=past)
    assert [h["step"] for h in evaluations] == [1] and "out of time at step 1" in logged[-1]


def test_update_policy_ratios_start_from_the_sampling_policy(task):
    """The first inner step's ratio is exactly 1 (the old log-probs are that step's own, the policy
    that sampled), the second sees the first's update."""
    policy, params, optimizer, batch, ref_logp = _update_setup(task, seed=7, lr=1e-2)
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    one = update_policy(policy, optimizer, params, batch, advantages, ref_logp, GRPOConfig(inner_steps=1))
    assert one["ratio"] == 1.0 and one["clip_frac"] == 0.0
    two = update_policy(policy, optimizer, params, batch, advantages, ref_logp, GRPOConfig(inner_steps=2))
    assert two["ratio"] != 1.0
