"""`tessera train --model.init_from=hf:DIR`: the run starts from the Hugging Face model's weights,
with its tokenizer, and fine-tuning lowers its perplexity on new text."""
import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, corpus_text):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("init_from")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([corpus_text], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                         bos_token="<|endoftext|>").save_pretrained(root / "hf")
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=300, bos_token_id=0, eos_token_id=0, n_embd=32, n_layer=2, n_head=4,
                                                         n_positions=64)).save_pretrained(root / "hf")
    (root / "text.txt").write_text(corpus_text[:30_000])
    return root


def tessera(*args):
    proc = subprocess.run([sys.executable, "-m", "tessera", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_training_starts_from_the_hf_weights_and_fine_tunes(hf_dir):
    tessera("data", "prepare", "--input", hf_dir / "text.txt", "--tokenizer", hf_dir / "hf", "--out", hf_dir / "data",
            "--shard-tokens", "4000")
    common = [f"--model.init_from=hf:{hf_dir / 'hf'}", f"--data.path={json.dumps(str(hf_dir / 'data'))}",
              "--train.seq_len=32", "--train.batch_size=8", "--eval.every=0", "--log.progress=false",
              "--log.tensorboard=false", "--optim.warmup_steps=1"]
    recipe = hf_dir / "empty.toml"
    recipe.write_text("")
    tessera("train", recipe, *common, "--train.steps=1", "--optim.lr=0", "--optim.min_lr=0", "--optim.weight_decay=0",
            f"--train.run_dir={json.dumps(str(hf_dir / 'frozen'))}")
    from tessera.core.checkpoint import load_model_from_checkpoint

    model = load_model_from_checkpoint(hf_dir / "frozen")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir / "hf").eval()
    idx = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, rtol=1e-4, atol=1e-4)

    def ppl(ckpt):
        return json.loads(tessera("eval", "perplexity", "--ckpt", ckpt, "--data", hf_dir / "data", "--seq-len", "32"))

    tessera("train", recipe, *common, "--train.steps=40", "--optim.lr=3e-3",
            f"--train.run_dir={json.dumps(str(hf_dir / 'tuned'))}")
    before, after = ppl(hf_dir / "frozen"), ppl(hf_dir / "tuned")
    key = next(k for k in before if "ppl" in k or "perplexity" in k)
    assert after[key] < 0.7 * before[key], (before, after)


def test_sft_with_lora_starts_from_the_hf_model_and_its_tokenizer(hf_dir):
    lines = [{"instruction": f"Who speaks in line {i}?", "output": "ROMEO speaks."} for i in range(24)]
    (hf_dir / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tessera("sft", hf_dir / "empty.toml", f"--model.init_from=hf:{hf_dir / 'hf'}",
                  f"--data.path={json.dumps(str(hf_dir / 'sft.jsonl'))}", "--train.seq_len=63", "--train.batch_size=4",
                  "--train.steps=6", "--eval.every=0", "--log.progress=false", "--log.tensorboard=false",
                  "--lora.r=4", f"--train.run_dir={json.dumps(str(hf_dir / 'sft'))}")
    assert "trained steps 0..6" in out and (hf_dir / "sft" / "merged" / "tokenizer.json").exists()
    from tessera.core.checkpoint import load_model_from_checkpoint

    merged = load_model_from_checkpoint(hf_dir / "sft" / "merged")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir / "hf").eval()
    idx = torch.randint(0, 300, (1, 12))
    with torch.no_grad():  # adapters moved the model away from where it started
        assert (merged(idx) - hf(idx).logits).abs().max() > 1e-4


def test_train_with_lora_adapts_only_the_target_layers(hf_dir):
    """`tessera train --lora.r=4`: continued pretraining of the HF model in which only the adapters
    learn: in the merged export every weight outside the target layers is the HF model's, bit for bit."""
    (hf_dir / "empty.toml").write_text("")
    if not (hf_dir / "data" / "manifest.json").exists():
        tessera("data", "prepare", "--input", hf_dir / "text.txt", "--tokenizer", hf_dir / "hf", "--out",
                hf_dir / "data", "--shard-tokens", "4000")
    out = tessera("train", hf_dir / "empty.toml", f"--model.init_from=hf:{hf_dir / 'hf'}",
                  f"--data.path={json.dumps(str(hf_dir / 'data'))}", "--train.seq_len=32", "--train.batch_size=8",
                  "--train.steps=8", "--optim.lr=1e-2", "--eval.every=0", "--log.progress=false",
                  "--log.tensorboard=false", "--lora.r=4", f"--train.run_dir={json.dumps(str(hf_dir / 'lora_lm'))}")
    assert "trained steps 0..8" in out and (hf_dir / "lora_lm" / "adapter" / "adapter.safetensors").exists()
    from safetensors.torch import load_file

    from tessera.core.checkpoint import load_model_from_checkpoint
    from tessera.interop.hf import load_init_weights

    merged = load_model_from_checkpoint(hf_dir / "lora_lm" / "merged")
    base = load_model_from_checkpoint(hf_dir / "lora_lm" / "merged")
    load_init_weights(base, init_from=f"hf:{hf_dir / 'hf'}")
    targets = set(json.loads((hf_dir / "lora_lm" / "adapter" / "adapter_config.json").read_text())["targets"])
    adapters = load_file(str(hf_dir / "lora_lm" / "adapter" / "adapter.safetensors"))
    adapted = {k.rsplit(".lora_", 1)[0] + ".weight" for k in adapters}
    assert adapted and all(k.split(".")[-2] in targets for k in adapted)
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, base.state_dict()[k])}
    assert changed and changed <= adapted, changed - adapted
