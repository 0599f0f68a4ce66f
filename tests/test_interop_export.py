"""ONNX export (onnxruntime gives the same logits at any batch and sequence length) and int8
quantization (close logits, a smaller file, generation through the quantized model)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_model

from tessera import kernels
from tessera.cli.main import main
from tessera.core.config import ModelConfig
from tessera.core.generate import Sampling, generate_tokens
from tessera.core.model import Transformer

LLAMA = dict(norm="rmsnorm", pos="rope", mlp="swiglu", n_kv_heads=2, tie_embeddings=False)
GPT2 = dict(norm="layernorm", pos="learned", mlp="gelu", bias=True)


@pytest.fixture(autouse=True)
def torch_kernels():
    kernels.configure("torch")


def _checkpoint(tmp_path, name, d_model=64, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, n_layers=2, n_heads=4, d_model=d_model, max_seq_len=48, **kw)
    model = Transformer(cfg).eval()
    ckpt = tmp_path / name
    ckpt.mkdir()
    save_model(model, str(ckpt / "model.safetensors"))
    (ckpt / "config.json").write_text(json.dumps(cfg.__dict__))
    return model, ckpt


@pytest.mark.parametrize("arch", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_onnx_matches_torch_on_dynamic_shapes(tmp_path, arch):
    ort = pytest.importorskip("onnxruntime")
    model, ckpt = _checkpoint(tmp_path, "ckpt", **arch)
    out = tmp_path / "model.onnx"
    assert main(["export", "onnx", str(ckpt), str(out)]) == 0
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for shape in [(1, 1), (3, 17), (2, 48)]:
        ids = torch.randint(0, 97, shape, generator=torch.Generator().manual_seed(shape[1]))
        logits = session.run(["logits"], {"input_ids": ids.numpy()})[0]
        with torch.no_grad():
            expected = model(ids)
        assert (torch.from_numpy(logits) - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_int8_is_close_smaller_and_generates(tmp_path, arch, char_tokenizer, capsys):
    from tessera.interop.quantize import load_quantized

    model, ckpt = _checkpoint(tmp_path, "ckpt", d_model=128, **arch)
    char_tokenizer.save(ckpt)
    out = tmp_path / "int8"
    assert main(["quantize", str(ckpt), str(out), "--int8"]) == 0
    quantized = load_quantized(out)
    size, size_q = (ckpt / "model.safetensors").stat().st_size, (out / "model.safetensors").stat().st_size
    assert size_q < 0.45 * size
    ids = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = model(ids), quantized(ids)
    assert (got - expected).abs().max().item() < 0.05 * expected.abs().max().item()
    agree = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
    assert agree > 0.9
    tokens = generate_tokens(quantized, [[1, 2, 3], [4]], 6, sampling=Sampling(temperature=0))
    assert [len(t) for t in tokens] == [6, 6]
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(out), "--prompt", "ROMEO", "--max-new-tokens", "5", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO")


def test_quantize_needs_a_method_and_refuses_plain_checkpoints(tmp_path, capsys):
    from tessera.interop.quantize import load_quantized

    _, ckpt = _checkpoint(tmp_path, "ckpt")
    assert main(["quantize", str(ckpt), str(tmp_path / "q")]) == 2
    assert "--int8" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not an int8 checkpoint"):
        load_quantized(ckpt)


def test_convert_cli_round_trip(tmp_path, capsys):
    _, ckpt = _checkpoint(tmp_path, "ckpt", **LLAMA)
    assert main(["convert", "to-hf", str(ckpt), str(tmp_path / "hf")]) == 0
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    assert (tmp_path / "back" / "model.safetensors").exists()
    assert main(["convert", "to-hf", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert "missing" in capsys.readouterr().err


def test_int8_linear_matches_a_float64_reference_and_rows_do_not_depend_on_their_batch():
    from tessera.interop.quantize import QMAX, Int8Linear

    g = torch.Generator().manual_seed(3)
    linear = torch.nn.Linear(37, 23)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(23, 37, generator=g))
        linear.bias.copy_(torch.randn(23, generator=g))
    x = torch.randn(5, 7, 37, generator=g) * torch.logspace(-3, 2, 7)[None, :, None]  # rows of very different scale
    int8 = Int8Linear.from_float(linear)
    got = int8(x)
    rows = x.reshape(-1, 37).double()
    s = rows.abs().amax(1, keepdim=True) / QMAX
    w = linear.weight.double()
    sw = w.abs().amax(1) / QMAX
    q, qw = torch.round(rows / s).clamp(-QMAX, QMAX), torch.round(w / sw[:, None]).clamp(-QMAX, QMAX)
    exact = (q @ qw.T) * s * sw
    reference = (exact + linear.bias.double()).reshape(5, 7, 23)
    # int32 sums are exact and below 2**24, so fp32 adds only the rounding of two products and one sum
    tolerance = 4 * torch.finfo(torch.float32).eps * (exact.abs() + linear.bias.double().abs()).reshape(5, 7, 23)
    assert ((got.double() - reference).abs() <= tolerance).all()
    assert torch.equal(got[2, 3], int8(x[2:3, 3:4])[0, 0])  # alone, it is bit for bit what it is in the batch
    assert (got.double() - linear(x).double()).abs().max() < 0.02 * linear(x).abs().max()


@pytest.mark.parametrize("arch", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_int8_model_takes_targets_and_full_precision_commands_refuse_it_in_one_line(tmp_path, arch, capsys):
    import torch.nn.functional as F

    from tessera.core.checkpoint import load_model_from_checkpoint
    from tessera.interop.quantize import load_for_inference, quantize_int8

    _, ckpt = _checkpoint(tmp_path, "ckpt", **arch)
    out = quantize_int8(ckpt, tmp_path / "int8")
    model = load_for_inference(out)
    ids = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(1))
    targets = ids.roll(-1, 1)
    targets[0, :4] = -100
    with torch.no_grad():
        loss = model(ids, targets)
        reference = F.cross_entropy(model(ids).double().flatten(0, 1), targets.flatten(), ignore_index=-100)
    assert abs(loss.item() - reference.item()) <= 1e-5 * reference.item()
    with pytest.raises(ValueError, match="int8 checkpoint") as refused:
        load_model_from_checkpoint(out)
    assert str(ckpt) in str(refused.value) and "\n" not in str(refused.value)
    capsys.readouterr()
    for command in (["export", "onnx", str(out), str(tmp_path / "m.onnx")],
                    ["convert", "to-hf", str(out), str(tmp_path / "hf")]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "int8 checkpoint" in err and err.count("\n") == 1 and "Traceback" not in err, (command, err)
