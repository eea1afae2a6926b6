"""Generation on the paged cache (CPU, tiny): greedy == argmax of the full forward, MTP
self-speculation == plain greedy (rejections and acceptances both exercised), sampling, bad input."""
import json

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
