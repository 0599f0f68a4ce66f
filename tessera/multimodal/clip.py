"""CLIP: an image tower and a text tower trained to agree, by a symmetric contrastive loss.

The image tower is the `VisionTransformer`, the text tower a Tessera `Transformer` read at each
caption's last token (its EOS: the causal mask makes that the one position that has seen the whole
caption). Linear projections map both into one space where matching pairs should be the most
similar; the temperature of the softmax is learned (as a log scale, capped).

With several data-parallel ranks, each rank's embeddings are all-gathered (autograd-aware) so the
negatives are the whole global batch; each rank scores its own rows against all columns. The mean
of the ranks' losses is then the one-process loss of the global batch and, once data parallelism
averages the gradients, so are the gradients.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from tessera.core.config import ClipConfig, ModelConfig, VisionConfig
from tessera.core.model import Transformer
from tessera.multimodal.retrieval import image_text_recall, zero_shot_accuracy
from tessera.multimodal.vision import VisionTransformer


class CLIP(nn.Module):
    def __init__(self, vision: VisionConfig, text: ModelConfig, clip: ClipConfig):
        super().__init__()
        self.vision = VisionTransformer(vision)
        self.text = Transformer(text)
        self.image_proj = nn.Linear(vision.d_model, clip.embed_dim, bias=False)
        self.text_proj = nn.Linear(text.d_model, clip.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / clip.temperature)))  # 1-D: FSDP shards no scalars
        self.max_log_scale = math.log(clip.max_logit_scale)
        nn.init.normal_(self.image_proj.weight, 0.0, vision.d_model ** -0.5)
        nn.init.normal_(self.text_proj.weight, 0.0, text.d_model ** -0.5)

    @property
    def cfg(self) -> ModelConfig:
        """The text tower's config: what a checkpoint's config.json holds (run_config.toml has the rest)."""
        return self.text.cfg

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.vision(pixels)[1]), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Embeddings of right-padded token rows (B, S) of `lengths` tokens each (EOS included)."""
        h = self.text.hidden_states(input_ids)
        return F.normalize(self.text_proj(h[torch.arange(h.shape[0], device=h.device), lengths - 1]), dim=-1)

    def forward(self, pixels: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None):
        """(image embeddings, text embeddings, logit scale (1,)); a tower without input gives None.
        One entry point, so that FSDP's hooks on the root gather the parameters whatever is encoded."""
        image = self.encode_image(pixels) if pixels is not None else None
        text = self.encode_text(input_ids, lengths) if input_ids is not None else None
        return image, text, self.logit_scale.clamp(max=self.max_log_scale).exp()  # (1,): no view for FSDP to hook


class GatherRows(torch.autograd.Function):
    """All ranks' rows in rank order; backward hands each rank the summed gradient of its own rows
    (an all-reduce, which every backend has, where NCCL alone has reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rows, ctx.rank = x.shape[0], dist.get_rank()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(rows of every data-parallel rank, concatenated in rank order; the offset of this rank's rows).
    The gather's backward sends each rank the gradients of its rows from every rank's loss."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x, 0
    return GatherRows.apply(x), dist.get_rank() * x.shape[0]


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor,
                     caption_ids: torch.Tensor | None = None, negatives: torch.Tensor | None = None,
                     negative_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE of this rank's pairs against the global batch (every rank the same number):
    each row's loss is -log of the softmax mass on its right answers. With `caption_ids` (B,), pairs
    with the same caption are right answers for each other: the text tower gives identical captions
    one embedding, so holding them apart as negatives would ask the impossible (and on a small
    vocabulary of captions, most batches hold duplicates). Without, each pair is its own caption.
    `negatives` (M, d), with their `negative_ids` (M,), are hard-negative captions (NegCLIP): extra
    columns of the image->text side, where a random batch would rarely hold the caption that differs
    from the right one in a single word."""
    all_image, offset = gather_rows(image)
    all_text, _ = gather_rows(text)
    if caption_ids is None:
        caption_ids = torch.arange(image.shape[0], device=image.device) + offset
        all_ids = torch.arange(all_image.shape[0], device=image.device)
    else:
        all_ids = gather_rows(caption_ids)[0]
    columns, column_ids = all_text, all_ids
    if negatives is not None:
        columns = torch.cat([all_text, gather_rows(negatives)[0]])
        column_ids = torch.cat([all_ids, gather_rows(negative_ids)[0]])

    def nce(rows: torch.Tensor, cols: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        # in float32 under autocast too: bf16 would round logits of scale ~50 by ~0.2, the size of
        # the margins that tell a caption from its hard negatives
        wide = torch.promote_types(rows.dtype, torch.float32)
        with torch.autocast(rows.device.type, enabled=False):
            logits = scale.to(wide) * rows.to(wide) @ cols.to(wide).T
        wrong = caption_ids[:, None] != ids[None, :]
        return (logits.logsumexp(dim=1) - logits.masked_fill(wrong, float("-inf")).logsumexp(dim=1)).mean()

    return (nce(image, columns, column_ids) + nce(text, all_image, all_ids)) / 2


def clip_objective(model: nn.Module, batch: dict[str, torch.Tensor]):
    """The contrastive loss, in training with the batch's hard-negative captions when it carries them
    (evaluation scores the plain loss, comparable whatever the training used); in evaluation also
    Recall@1/5/10 both ways over the gathered batch and, when the batch carries class prompts,
    zero-shot classification accuracy."""
    ids, lengths, caption_ids = batch["input_ids"], batch["lengths"], batch["caption_ids"]
    rows = ids.shape[0]
    hard = model.training and "negative_input_ids" in batch
    if hard:  # one pass of the text tower over captions and negatives
        ids, lengths = torch.cat([ids, batch["negative_input_ids"]]), torch.cat([lengths, batch["negative_lengths"]])
        caption_ids = torch.cat([caption_ids, batch["negative_caption_ids"]])
    # each distinct caption once (a small vocabulary of captions repeats many times in a batch);
    # indexing back sums the repeats' gradients, as encoding every row would
    distinct, where = torch.unique(caption_ids, return_inverse=True)
    first = torch.full_like(distinct, len(caption_ids)).scatter_reduce(
        0, where, torch.arange(len(caption_ids), device=where.device), "amin")
    image, texts, scale = model(batch["pixel_values"], ids[first], lengths[first])
    texts = texts[where]
    text, negatives = texts[:rows], (texts[rows:] if hard else None)
    loss = contrastive_loss(image, text, scale, batch["caption_ids"], negatives,
                            batch["negative_caption_ids"] if hard else None)
    metrics = {"logit_scale": scale.detach()}
    if not model.training:
        all_image, all_text = gather_rows(image)[0], gather_rows(text)[0]
        metrics.update(image_text_recall(all_image, all_text, gather_rows(batch["caption_ids"])[0]))
        if "class_ids" in batch:
            classes = model(input_ids=batch["class_ids"], lengths=batch["class_lengths"])[1]
            metrics["zero_shot_acc"] = zero_shot_accuracy(image, classes, batch["labels"])
    return loss, metrics
