"""python -m pretrain.evaluate CKPT --data HELDOUT: answer held-out questions by greedy generation.

Reads question/answer conversations (samples carrying ``qa_type`` and ``answer``, as
``data_prep synthetic`` writes them) from a shard directory, renders each prompt exactly as
training renders conversations, generates greedily until ``<|im_end|>`` and scores exact match
(case- and punctuation-insensitive). Two references put the number in context:
  chance  uniform guessing among the answers that type has in the data set;
  blind   the same model with every image replaced by a blank one of the same size (what the
          model gets from the question text alone).
Runs in one process at TP1PP1 (the checkpoint reshards from whatever layout saved it).
"""

from __future__ import annotations

import argparse
import io
import json
import string
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image


def read_questions(data: Path, limit: int | None) -> list[tuple[dict, list[bytes]]]:
    """(sample json, image bytes in order) of every QA conversation in the shards, in order."""
    import webdataset as wds

    shards = sorted(str(p) for p in Path(data).glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"{data} holds no .tar shards")
    out = []
    # Raw bytes only: no webdataset decoders (they would unpickle .pyd members).
    for sample in wds.WebDataset(shards, shardshuffle=False, empty_check=False):
        meta = json.loads(sample["json"])
        if meta.get("kind") != "conversation" or "answer" not in meta:
            continue
        images = [sample[f"img{i}.jpg"] if f"img{i}.jpg" in sample else sample[f"img{i}.png"]
                  for i in range(len(meta.get("images", [])))]
        out.append((meta, images))
        if limit and len(out) >= limit:
            break
    return out


def normalise_answer(text: str) -> str:
    return text.strip().lower().strip(string.punctuation + " ").strip()


def blank_images(meta: dict) -> list[bytes]:
    """White PNGs of the recorded sizes: the blind baseline's images carry no information."""
    out = []
    for info in meta.get("images", []):
        h, w = info["size"]
        buf = io.BytesIO()
        Image.new("RGB", (w, h), (255, 255, 255)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def evaluate(model, template, questions, max_new_tokens: int, batch_size: int = 32) -> dict:
    from pretrain.data.prompt import build_prompt
    from pretrain.model.generate import greedy_generate_many

    # Every question twice: with its images, and blind (blank images of the same sizes). Prompts
    # (with their patches) are built a chunk of questions at a time, so memory stays bounded.
    outputs = []
    for start in range(0, len(questions), 8 * batch_size):
        prompts = []
        for meta, images in questions[start:start + 8 * batch_size]:
            for blind in (False, True):
                p = build_prompt(template, meta, blank_images(meta) if blind else images)
                prompts.append((p.tokens, p.image_ids, p.image_grids, p.patches))
        outputs += greedy_generate_many(model, prompts, max_new_tokens, template.im_end_id, batch_size)

    def decode(new: list[int]) -> str:
        if new and new[-1] == template.im_end_id:
            new = new[:-1]
        return template.tokenizer.decode(new, skip_special_tokens=True)

    per_type = defaultdict(lambda: {"n": 0, "correct": 0, "blind_correct": 0, "answers": set()})
    examples = []
    for i, (meta, _) in enumerate(questions):
        answers = {False: decode(outputs[2 * i]), True: decode(outputs[2 * i + 1])}
        gold = normalise_answer(meta["answer"])
        row = per_type[meta["qa_type"]]
        row["n"] += 1
        row["correct"] += normalise_answer(answers[False]) == gold
        row["blind_correct"] += normalise_answer(answers[True]) == gold
        row["answers"].add(gold)
        if len(examples) < 10:
            question = [t["content"] for t in meta["conversations"] if t["role"] == "user"][-1]
            examples.append({"question": question, "answer": meta["answer"], "predicted": answers[False],
                             "blind": answers[True]})
    table = {}
    for qa_type, row in sorted(per_type.items()):
        table[qa_type] = {"n": row["n"], "accuracy": row["correct"] / row["n"],
                          "blind": row["blind_correct"] / row["n"], "chance": 1.0 / len(row["answers"]),
                          "answers": len(row["answers"])}
    n = sum(r["n"] for r in table.values())
    table["all"] = {"n": n, "accuracy": sum(r["accuracy"] * r["n"] for r in table.values()) / max(1, n),
                    "blind": sum(r["blind"] * r["n"] for r in table.values()) / max(1, n),
                    "chance": sum(r["chance"] * r["n"] for r in table.values()) / max(1, n)}
    return {"table": table, "examples": examples}


def format_table(table: dict) -> str:
    lines = [f"{'question type':<14} {'n':>5} {'accuracy':>9} {'blind':>7} {'chance':>7}"]
    for qa_type, row in table.items():
        lines.append(f"{qa_type:<14} {row['n']:>5} {100 * row['accuracy']:>8.1f}% {100 * row['blind']:>6.1f}% "
                     f"{100 * row['chance']:>6.1f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="one of our checkpoints (or a checkpoint directory)")
    parser.add_argument("--data", type=Path, required=True, help="held-out shard directory")
    parser.add_argument("--tokenizer", type=Path, default=None, help="default: CKPT/tokenizer")
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    from pretrain.checkpoint import checkpointer

    started = time.perf_counter()
    try:
        return _evaluate(args, started)
    except checkpointer.CheckpointError as err:  # damaged, incomplete or crafted checkpoint
        print(f"error: {err}", file=sys.stderr)
        return 1


def _evaluate(args: argparse.Namespace, started: float) -> int:
    from pretrain.checkpoint import checkpointer
    from pretrain.checkpoint.weights import load_weights
    from pretrain.convert.hf import read_model_config, single_process_model
    from pretrain.data.template import ChatTemplate, load_tokenizer

    ckpt = checkpointer.resolve(args.checkpoint)
    template = ChatTemplate(load_tokenizer(args.tokenizer or ckpt / "tokenizer"))
    questions = read_questions(args.data, args.max_samples)
    if not questions:
        print(f"error: {args.data} has no question/answer samples (qa_type + answer)", file=sys.stderr)
        return 2
    neo = read_model_config(ckpt)
    torch.set_grad_enabled(False)
    with single_process_model(neo, init=False) as model:
        load_weights(model, ckpt / "model")
        print(f"evaluating {ckpt} on {len(questions)} held-out questions", flush=True)
        result = evaluate(model, template, questions, args.max_new_tokens)
    result.update(checkpoint=str(ckpt), data=str(args.data), seconds=time.perf_counter() - started)
    print(format_table(result["table"]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
