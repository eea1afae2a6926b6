"""Generation on the paged cache (CPU, tiny): greedy == argmax of the full forward, MTP
self-speculation == plain greedy (rejections and acceptances both exercised), sampling, bad input."""
import pytest
import torch

import model.generate as gen
from model.config import preset
from model.generate import ByteTokenizer, generate
from model.model import random_model


@pytest.fixture(scope="module")
def tiny():
    # float64: decode, verify and full-forward shapes round differently; in float32 that can flip a
    # near-tied expert choice or argmax (see the tiny fixture of tests/test_model_reference.py).
    return random_model(preset("tiny", dtype="float64"))


def _prompts(vocab, lengths):
    return [torch.randint(0, vocab, (n,)).tolist() for n in lengths]


def test_greedy_equals_full_forward_argmax(tiny):
    prompts = _prompts(tiny.args.vocab_size, [3, 66, 1, 20])
    outputs, stats = generate(tiny, prompts, 12)
    assert stats["tokens_per_s"] > 0
    for prompt, new in zip(prompts, outputs):
        assert len(new) == 12
        logits, _ = tiny(torch.tensor([prompt + new]))
        assert logits[0, len(prompt) - 1:-1].argmax(-1).tolist() == new


def test_mtp_speculative_equals_greedy(tiny):
    prompts = _prompts(tiny.args.vocab_size, [4, 70, 9])
    greedy, _ = generate(tiny, prompts, 16)
    speculative, stats = generate(tiny, prompts, 16, use_mtp=True)
    assert speculative == greedy
    assert 0.0 <= stats["acceptance_rate"] <= 1.0


def test_mtp_with_an_oracle_draft_accepts_and_stays_exact(tiny, monkeypatch):
    """Random weights never draft right; an oracle MTP (the true greedy token, wrong at every
    third position) drives both the accept and the reject path through the cache bookkeeping."""
    prompts = _prompts(tiny.args.vocab_size, [5, 67, 2])
    greedy, _ = generate(tiny, prompts, 20)
    full = [p + g for p, g in zip(prompts, greedy)]
    real_step = gen.mtp_step

    def oracle(model, hidden, next_tokens, start_pos, block_table, decode):
        logits = real_step(model, hidden, next_tokens, start_pos, block_table, decode)  # keeps the MTP cache real
        b, s = next_tokens.shape
        start = torch.zeros(b, dtype=torch.long) if start_pos is None else start_pos
        for i in range(b):
            for j in range(s):
                target = int(start[i]) + j + 2  # MTP at position p predicts token p + 2
                if target < len(full[i]):
                    token = full[i][target] if target % 3 else (full[i][target] + 1) % model.args.vocab_size
                    logits[i, j, token] = 1e9
        return logits

    monkeypatch.setattr(gen, "mtp_step", oracle)
    speculative, stats = generate(tiny, prompts, 20, use_mtp=True)
    assert speculative == greedy
    assert 0.3 < stats["acceptance_rate"] < 1.0
    assert stats["verify_steps"] < 19


def test_sampling_is_seeded_and_in_vocab(tiny):
    prompts = _prompts(tiny.args.vocab_size, [3, 8])
    a, _ = generate(tiny, prompts, 8, temperature=0.8, top_p=0.9, seed=7)
    b, _ = generate(tiny, prompts, 8, temperature=0.8, top_p=0.9, seed=7)
    assert a == b
    assert all(0 <= t < tiny.args.vocab_size for row in a for t in row)


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = {int(gen.sample(logits, 1.0, 0.7, torch.Generator().manual_seed(s))) for s in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 covers 0.7; tokens 2 and 3 are cut


def test_bad_prompts(tiny):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(tiny, [[1, 2], []], 4)
    with pytest.raises(ValueError, match="exceed the cache capacity"):
        generate(tiny, [[1] * 1000], 100)
    with pytest.raises(ValueError, match="at least one prompt"):
        generate(tiny, [], 4)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 512\)"):
        generate(tiny, [[1, 600]], 4)
    with pytest.raises(ValueError, match="temperature=0"):
        generate(tiny, [[1, 2]], 4, temperature=1.0, use_mtp=True)


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer(bos_id=256, eos_id=257)
    ids = tok.encode("héllo, Hopper")
    assert ids[0] == 256 and tok.decode(ids) == "héllo, Hopper"


def test_cli_runs(capsys):
    gen.main(["--prompt", "hi", "--max-new-tokens", "4", "--mtp"])
    out = capsys.readouterr().out
    assert "'hi' ->" in out and "acceptance_rate" in out and "tokens_per_s" in out
