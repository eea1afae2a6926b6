"""Generation on the paged cache (CPU, tiny): greedy == argmax of the full forward, MTP
self-speculation == plain greedy (rejections and acceptances both exercised), sampling, stopping
at eos, bad input."""
import json
import math
import warnings

import pytest
import torch

import model.generate as gen
from model.checkpoint import save_checkpoint
from model.config import PRESETS, preset
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


def _multinomial_sample(logits, temperature, top_p, generator):
    """The nucleus sampler as torch.multinomial draws it (which reads the probabilities on the host)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    sorted_probs = sorted_probs.masked_fill(sorted_probs.cumsum(-1) - sorted_probs > top_p, 0.0)
    return order.gather(-1, torch.multinomial(sorted_probs, 1, generator=generator)).squeeze(-1)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (1.5, 0.3)])
def test_sampling_draws_what_multinomial_draws(temperature, top_p):
    for seed in range(20):
        logits = torch.randn(6, 300, dtype=torch.float64) * 3
        ours = gen.sample(logits, temperature, top_p, torch.Generator().manual_seed(seed))
        theirs = _multinomial_sample(logits, temperature, top_p, torch.Generator().manual_seed(seed))
        assert torch.equal(ours, theirs), (seed, ours, theirs)


def _forcing_eos(monkeypatch, eos, finish_at):
    """Patches the decode step: row b emits eos as its new token finish_at[b] (the first new token
    is 0, decode step i makes token i), once; returns the list the calls are counted in."""
    real, calls = gen.decode_one_token, []

    def forcing(model, tokens, cache_seqlens, block_table):
        logits, hidden = real(model, tokens, cache_seqlens, block_table)
        calls.append(None)
        for b, at in enumerate(finish_at):
            if len(calls) == at:
                logits[b, 0, eos] = 1e9
        return logits, hidden

    monkeypatch.setattr(gen, "decode_one_token", forcing)
    return calls


@pytest.mark.parametrize("temperature,stop_check_every", [(0.0, 1), (1.0, 4), (0.8, 8), (1.0, 64)])
def test_eos_stop_returns_prefixes_and_decodes_less(tiny, monkeypatch, temperature, stop_check_every):
    prompts, eos, max_new = _prompts(tiny.args.vocab_size, [3, 66, 9]), 7, 24
    calls = _forcing_eos(monkeypatch, eos, finish_at=[2, 9, 5])
    full, _ = generate(tiny, prompts, max_new, temperature, seed=5)
    assert len(calls) == max_new - 1
    calls.clear()
    early, _ = generate(tiny, prompts, max_new, temperature, seed=5, eos_id=eos, stop_check_every=stop_check_every)
    all_done = max(row.index(eos) for row in full) + 1  # tokens until every row holds its eos: <= 10
    expected = min(max_new, math.ceil(all_done / stop_check_every) * stop_check_every)  # the next check
    assert len(calls) == expected - 1
    if stop_check_every < max_new:
        assert expected < max_new  # stopped early
    for row_full, row_early in zip(full, early):
        assert row_early == row_full[:expected]
        cut = row_full[:row_full.index(eos) + 1]
        assert row_early[:row_early.index(eos) + 1] == cut


def test_eos_stop_waits_for_every_row(tiny, monkeypatch):
    prompts = _prompts(tiny.args.vocab_size, [5, 12])
    unforced, _ = generate(tiny, prompts, 16, 1.0, seed=2)
    # Row 1 never draws this eos: its tokens depend on its own logits and noise, not on row 0's.
    eos = min(set(range(tiny.args.vocab_size)) - set(unforced[1]))
    calls = _forcing_eos(monkeypatch, eos, finish_at=[1])  # row 0 only
    full, _ = generate(tiny, prompts, 16, 1.0, seed=2)
    assert eos in full[0] and full[1] == unforced[1]
    calls.clear()
    early, _ = generate(tiny, prompts, 16, 1.0, seed=2, eos_id=eos, stop_check_every=2)
    assert early == full and len(calls) == 15


def test_mtp_eos_stop_is_a_prefix_of_greedy(tiny):
    prompt = _prompts(tiny.args.vocab_size, [6])
    (greedy,), _ = generate(tiny, prompt, 16)
    eos = greedy[3]
    (speculative,), stats = generate(tiny, prompt, 16, use_mtp=True, eos_id=eos)
    first = greedy.index(eos)
    assert speculative == greedy[:len(speculative)]
    assert first + 1 <= len(speculative) <= first + 2  # an accepted draft may carry one token past eos
    assert stats["verify_steps"] <= first


@pytest.mark.gpu
def test_sampling_loop_reads_the_device_once_per_stop_check():
    """The decode step stubbed with fixed logits: what syncs is the loop itself, not the model."""
    batch, vocab, max_new, every, eos = 4, 1000, 33, 8, 0
    generator = torch.Generator("cuda").manual_seed(0)
    logits = torch.randn(batch, 1, vocab, device="cuda", generator=generator)
    logits[..., eos] = float("-inf")  # no row finishes: every check reads, none stops
    first = gen.sample(logits[:, 0], 1.0, 0.9, generator)
    lengths = torch.full((batch,), 5, device="cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = gen._sampling_loop(None, first, lengths, None, max_new, 1.0, 0.9, generator,
                                     lambda *args: (logits, None), gen.Progress(0, False), eos, every)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchronizing CUDA operation" in str(w.message)]
    assert len(out[0]) == max_new
    assert 1 <= len(syncs) <= (max_new - 1) // every + 1  # the stop checks and the final copy to the host


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
    with pytest.raises(ValueError, match=r"'eos_id': expected a token id in \[0, 512\), got 512"):
        generate(tiny, [[1, 2]], 4, eos_id=512)
    with pytest.raises(ValueError, match="'stop_check_every': expected >= 1, got 0"):
        generate(tiny, [[1, 2]], 4, eos_id=3, stop_check_every=0)


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer(bos_id=256, eos_id=257)
    ids = tok.encode("héllo, Hopper")
    assert ids[0] == 256 and tok.decode(ids) == "héllo, Hopper"


def test_cli_runs(capsys):
    gen.main(["--prompt", "hi", "--max-new-tokens", "4", "--mtp"])
    out = capsys.readouterr().out
    assert "'hi' ->" in out and "acceptance_rate" in out and "tokens_per_s" in out


def test_cli_without_checkpoint_says_the_model_is_random(capsys):
    gen.main(["--prompt", "hi", "--max-new-tokens", "2"])
    assert "RANDOM model (preset 'tiny', seed 0)" in capsys.readouterr().err


def test_cli_help_lists_presets_defaults_and_randomness(capsys):
    with pytest.raises(SystemExit) as exit_info:
        gen.main(["--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "{" + ",".join(sorted(PRESETS)) + "}" in out and "(default: tiny)" in out and "(default: 32)" in out
    assert "the model is RANDOM" in out and "--no-mtp" in out


@pytest.mark.parametrize("argv,message", [
    (["--preset", "nope"], "argument --preset: invalid choice: 'nope'"),
    (["--mtp", "--no-mtp"], "not allowed with argument"),
    (["--dtype", "int8"], "argument --dtype: invalid choice"),
    (["--no-mtp", "--mtp"], "not allowed with argument"),
    (["--no-mtp", "--prompt", "hi", "--max-new-tokens", "99999"], "exceed the cache capacity"),
])
def test_cli_usage_errors_are_not_tracebacks(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        gen.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m model.generate") and message in err


def test_cli_checkpoint_errors_are_usage_errors(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        gen.main(["--checkpoint", str(tmp_path)])
    assert exit_info.value.code == 2 and "no config.json" in capsys.readouterr().err


def test_cli_no_mtp_refuses_speculation_on_a_checkpoint_without_mtp(capsys, tmp_path):
    save_checkpoint(random_model(preset("tiny")), tmp_path)
    gen.main(["--checkpoint", str(tmp_path), "--no-mtp", "--prompt", "hi", "--max-new-tokens", "2"])
    assert "'hi' ->" in capsys.readouterr().out
    # As transformers saves: config.json says num_nextn_predict_layers 1, the weights hold no MTP layer.
    save_checkpoint(random_model(preset("tiny", num_nextn_predict_layers=0)), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    with pytest.raises(SystemExit), pytest.warns(UserWarning, match="no MTP weights"):
        gen.main(["--checkpoint", str(tmp_path), "--mtp", "--prompt", "hi", "--max-new-tokens", "2"])
    assert "use_mtp=True needs the MTP module" in capsys.readouterr().err
