"""Assistant: pretrain -> SFT -> DPO -> serve, on the stages that exist (`tessera train`, `sft`,
`dpo`, `serve`). The instructions are checkable tasks (`assistant_tasks.py`: reverse a word, sort
words, count a letter, add two numbers) whose rule judge scores every answer; the DPO pairs are
the SFT model's own answers (rejected when the judge says wrong, else a plausible wrong answer)
against the right one. Reported on held-out prompts never trained on: each model's accuracy per
task and the DPO model's win rate over the SFT model under the judge."""
from __future__ import annotations

import json
import random
from typing import TYPE_CHECKING

from tessera.core.config import CONFIG_DIR

if TYPE_CHECKING:
    import torch

    from tessera.recipes.runner import RecipeContext

GENERAL = CONFIG_DIR.parent / "data" / "tinyshakespeare.txt"
# the transcript `tessera serve` renders a chat request as ("user: ...\nassistant:"), so that the
# served model sees exactly the format it was fine-tuned on
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
SMOKE = ["--train.steps=4", "--model.n_layers=2",
         "--model.d_model=32", "--model.d_ff=88", "--eval.every=0", "--checkpoint.every=0", "--log.every=4",
         "--train.compile=false", "--optim.warmup_steps=2", "--train.batch_size=4"]
SIZES = {"sft": (6000, 40), "dpo": (800, 8), "heldout": (400, 8)}  # prompts (full, smoke)
SFT = ["--optim.lr=1e-3", "--optim.min_lr=1e-4", "--optim.warmup_steps=50"]
SFT_STEPS = (500, 4)
DPO = ["--optim.lr=5e-5", "--optim.min_lr=5e-6", "--optim.warmup_steps=10", "--align.beta=0.1",
       "--optim.weight_decay=0"]
DPO_STEPS = (150, 4)


def prepare(ctx: RecipeContext) -> None:
    """Under data.path: the play as pretraining shards (90/10) with a character tokenizer that also
    covers the tasks, and the chat template in its `tokenizer_config.json`; `sft.jsonl`,
    `sft_val.jsonl` and `heldout.jsonl` of task prompts, pairwise disjoint."""
    from tessera.core.data import prepare as prepare_shards
    from tessera.core.tokenizer import train_char
    from tessera.recipes.assistant_tasks import task_set

    root = ctx.data_dir
    root.mkdir(parents=True, exist_ok=True)
    seed = ctx.cfg.train.seed
    heldout = task_set(ctx.pick(*SIZES["heldout"]), seed)
    seen = frozenset(p for p, _ in heldout)
    sft = task_set(ctx.pick(*SIZES["sft"]), seed + 1, seen)
    sft_val = task_set(ctx.pick(200, 8), seed + 2, seen | {p for p, _ in sft})
    for name, tasks in (("heldout", heldout), ("sft", sft), ("sft_val", sft_val)):
        lines = [json.dumps({"instruction": p, "output": a}) for p, a in tasks]
        (root / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    general = GENERAL.read_text(encoding="utf-8")[: ctx.pick(None, 60_000)]
    (root / "general.txt").write_text(general, encoding="utf-8")
    tasks_text = "".join(f"user: {p}\nassistant: {a}\n" for p, a in heldout + sft + sft_val)
    tok = train_char([general, tasks_text, "0123456789"])
    prepare_shards([str(root / "general.txt")], tok, root, 0.1, ctx.pick(0, 4_000))
    config = json.loads((root / "tokenizer_config.json").read_text())
    (root / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}, indent=2))


def answers(model: torch.nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 24) -> list[str]:
    """The model's greedy answer to each prompt as a user turn, to its end-of-text token (what
    `tessera serve` answers at temperature 0), decoded in left-padded batches."""
    from tessera.alignment.sft_data import render
    from tessera.core.generate import Sampling, generate_tokens

    out = []
    for start in range(0, len(prompts), 64):
        ids = [tokenizer.encode(render(CHAT_TEMPLATE, [{"role": "user", "content": p}], add_generation_prompt=True))
               for p in prompts[start:start + 64]]
        for seq in generate_tokens(model, ids, max_new_tokens, sampling=Sampling(temperature=0),
                                   stop_ids=[tokenizer.eos_id], pad_id=tokenizer.pad_id):
            out.append(tokenizer.decode(seq[:-1] if seq and seq[-1] == tokenizer.eos_id else seq).strip())
    return out


def accuracy(prompts: list[str], responses: list[str]) -> dict[str, float]:
    """The judge's mean score, overall and per task kind."""
    from tessera.recipes.assistant_tasks import KINDS, judge

    scores = {kind: [] for kind in KINDS}
    for prompt, response, i in zip(prompts, responses, range(len(prompts))):
        scores[KINDS[i % len(KINDS)]].append(judge(prompt, response))
    out = {"accuracy": sum(map(sum, scores.values())) / len(prompts)}
    out.update({f"accuracy {k}": sum(v) / len(v) for k, v in scores.items() if v})
    return out


def preference_pairs(ctx: RecipeContext, model: torch.nn.Module, tokenizer, exclude: frozenset[str]) -> int:
    """`dpo.jsonl`: for fresh prompts, the right answer (chosen) against the SFT model's answer when
    the judge says it is wrong, else against a plausible wrong answer; how many were the model's own."""
    from tessera.recipes.assistant_tasks import judge, solve, task_set, wrong_answer

    prompts = [p for p, _ in task_set(ctx.pick(*SIZES["dpo"]), ctx.cfg.train.seed + 3, exclude)]
    rng = random.Random(ctx.cfg.train.seed)
    own = 0
    lines = []
    for prompt, response in zip(prompts, answers(model, tokenizer, prompts)):
        wrong = not judge(prompt, response)
        own += wrong
        rejected = response if wrong else wrong_answer(prompt, rng)
        lines.append(json.dumps({"prompt": prompt, "chosen": solve(prompt), "rejected": rejected}))
    (ctx.data_dir / "dpo.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return own


def _read(path) -> list[str]:
    return [json.loads(line)["instruction"] for line in path.read_text(encoding="utf-8").splitlines()]


def run(ctx: RecipeContext) -> dict:
    """prepare -> pretrain -> SFT -> preference pairs from the SFT model -> DPO -> held-out accuracy
    of both and the win rate -> summary (the DPO model is the run's checkpoint, ready for `tessera serve`)."""
    from tessera.recipes.assistant_tasks import win_rate
    from tessera.recipes.runner import load_trained, write_summary
    from tessera.recipes.stages import train_stage

    root = ctx.data_dir
    with ctx.timer("prepare"):
        prepare(ctx)
    pretrained = train_stage(ctx, "pretrain (general text)", ctx.out / "pretrain", [])
    sft = train_stage(ctx, "SFT", ctx.out / "sft",
                      [f'--model.init_from="{pretrained}"', f'--data.path="{root / "sft.jsonl"}"',
                       f'--align.val_path="{root / "sft_val.jsonl"}"', f"--train.steps={ctx.pick(*SFT_STEPS)}", *SFT],
                      "sft")
    tok = ctx.tokenizer()
    heldout = _read(root / "heldout.jsonl")
    with ctx.timer("preference pairs"):
        sft_model = load_trained(sft)
        trained_on = {*heldout, *_read(root / "sft.jsonl")}
        own = preference_pairs(ctx, sft_model, tok, frozenset(trained_on))
    dpo = train_stage(ctx, "DPO", ctx.out,
                      [f'--model.init_from="{sft}"', f'--data.path="{root / "dpo.jsonl"}"',
                       f"--train.steps={ctx.pick(*DPO_STEPS)}", *DPO], "dpo")
    with ctx.timer("evaluate"):
        dpo_model = load_trained(dpo)
        by_sft, by_dpo = answers(sft_model, tok, heldout), answers(dpo_model, tok, heldout)
        quarter = heldout[: max(4, len(heldout) // 4)]  # the base model never stops: a quarter is enough to see 0
        before = {**accuracy(heldout, by_sft),
                  "accuracy (pretrained model)": accuracy(quarter, answers(load_trained(pretrained), tok, quarter))["accuracy"]}
        after = accuracy(heldout, by_dpo)
        after.update({f"DPO vs SFT {k}": v for k, v in win_rate(heldout, by_dpo, by_sft).items()})
        after["DPO pairs rejecting the SFT model's own answer"] = own
    samples = {p: f"SFT: {s!r}  DPO: {d!r}" for p, s, d in list(zip(heldout, by_sft, by_dpo))[:4]}
    return write_summary(ctx, before, after, samples, dpo)
