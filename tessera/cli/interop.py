"""`tessera convert | export | quantize | serve`: checkpoints to and from other tools, and an
OpenAI-style HTTP server."""
from __future__ import annotations

import os

from tessera.cli.errors import UsageError
from tessera.cli.evaluate import DEVICES


def cmd_convert(args) -> None:
    from tessera.interop.hf import convert_from_hf, convert_to_hf

    if args.action == "from-hf":
        print(f"wrote Tessera checkpoint {convert_from_hf(args.src, args.out)}")
    else:
        print(f"wrote Hugging Face model {convert_to_hf(args.src, args.out, args.max_shard_size)}")


def cmd_export_onnx(args) -> None:
    from tessera.interop.onnx_export import export_onnx

    print(f"wrote {export_onnx(args.ckpt, args.out, args.opset)}")


def cmd_quantize(args) -> None:
    from tessera.interop.quantize import quantize_int8

    if not args.int8:
        raise UsageError("choose a quantization: --int8 (the only one so far)")
    print(f"wrote int8 checkpoint {quantize_int8(args.ckpt, args.out)}")


def cmd_serve(args) -> None:
    from tessera.interop.serve import ServeLimits, serve

    limits = ServeLimits(max_batch=args.max_batch, max_prompt_tokens=args.max_prompt_tokens,
                         max_new_tokens=args.max_tokens)
    serve(args.ckpt, args.host, args.port, os.environ.get(args.api_key_env) or None, limits, args.device,
          loaded=vision_model_for_serving(args.ckpt, args.device))


def vision_model_for_serving(ckpt: str, device: str):
    """A `tessera vlm` checkpoint's decoder, tokenizer, name and image prompt embedder (None for a text
    model): interop serves the decoder and knows no vision model, so the images are embedded here."""
    import torch

    from tessera.core.checkpoint import find_checkpoint
    from tessera.core.tokenizer import load_tokenizer
    from tessera.multimodal.vlm_inference import PromptEmbedder, is_vlm_checkpoint, load_vlm

    ckpt = find_checkpoint(ckpt)
    if not is_vlm_checkpoint(ckpt):
        return None
    model, cfg = load_vlm(ckpt, "cuda" if device == "auto" and torch.cuda.is_available() else
                          ("cpu" if device == "auto" else device))
    tokenizer = load_tokenizer(ckpt)
    return model.lm, tokenizer, ckpt.name, PromptEmbedder(model, cfg, tokenizer)


def add_parsers(sub) -> None:
    cv = sub.add_parser("convert", help="Hugging Face <-> Tessera checkpoints").add_subparsers(dest="action",
                                                                                            required=True)
    cf = cv.add_parser("from-hf", help="a Hugging Face Llama/Mistral/Qwen2/GPT-2 directory -> a Tessera checkpoint")
    cf.add_argument("src", help="directory with config.json and safetensors weights")
    cf.add_argument("out")
    cf.set_defaults(func=cmd_convert)
    ct = cv.add_parser("to-hf", help="a Tessera checkpoint (or run directory) -> a Hugging Face directory")
    ct.add_argument("src", help="a checkpoint, or a run directory (its newest checkpoint)")
    ct.add_argument("out")
    ct.add_argument("--max-shard-size", default="5GB", help="split the weights into shards of at most this size")
    ct.set_defaults(func=cmd_convert)

    ex = sub.add_parser("export", help="export a checkpoint to ONNX").add_subparsers(dest="action", required=True)
    eo = ex.add_parser("onnx", help="ONNX graph with dynamic batch and sequence axes, returning logits")
    eo.add_argument("ckpt")
    eo.add_argument("out", help="OUT.onnx")
    eo.add_argument("--opset", type=int, default=18)
    eo.set_defaults(func=cmd_export_onnx)

    qu = sub.add_parser("quantize", help="quantize a checkpoint's linear layers for CPU inference")
    qu.add_argument("ckpt")
    qu.add_argument("out")
    qu.add_argument("--int8", action="store_true", help="dynamic int8 (weights int8, activations quantized per batch)")
    qu.set_defaults(func=cmd_quantize)

    sv = sub.add_parser("serve", help="OpenAI-style HTTP completions server")
    sv.add_argument("--ckpt", required=True, help="a checkpoint, or a run directory (its newest checkpoint)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key-env", default="TESSERA_API_KEY", help="environment variable holding the API key (unset: no key)")
    sv.add_argument("--max-batch", type=int, default=32)
    sv.add_argument("--max-prompt-tokens", type=int, default=0, help="default: the model's context minus one")
    sv.add_argument("--max-tokens", type=int, default=512, help="largest max_tokens a request may ask for")
    sv.add_argument("--device", default="auto", choices=DEVICES)
    sv.set_defaults(func=cmd_serve)
