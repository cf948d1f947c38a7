"""Measure a student's pass rate on each level of the ``math`` task (or, with
``--task wordplay``, of the ``wordplay`` task).

    python -m gadiag_tasks.measure_pass_rates --samples 40
    python -m gadiag_tasks.measure_pass_rates --task wordplay --samples 24 --threads 1
    python -m gadiag_tasks.measure_pass_rates --model gemma3-270m --examples 3 --samples 24 --threads 1

Loads the model as gadiag does (``--model``: an alias, a .gguf file, a folder
or a hub id; default SmolLM2-135M-Instruct), builds the prompt as a run does
(its chat template, or plain "Q: …\nA:" text for a base model:
``--prompt-format``), samples one completion per problem with plain
temperature sampling (no top-k/top-p), stopping at the student's end tokens
(a line break ends a plain-text answer), and prints, per level: pass rate with
a 95% Wilson interval, mean completion tokens, and the share of completions
cut at --max-new-tokens.

Not imported by the package.
"""

from __future__ import annotations

import argparse
import math
import time

def load_student(model: str, prompt_format: str = "auto"):
    """The model as a gadiag HFCausalLM (its prompt format and end tokens)."""
    from gadiag_plugins.students.hf import load_lm

    return load_lm(model, prompt_format=prompt_format)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def generate(tokenizer, lm, prompts: list[list[int]], max_new_tokens: int, temperature: float, seed: int, eos_ids=None):
    """Completions (ids up to and including the first end token) for left-padded prompts."""
    import torch

    eos_ids = set(eos_ids or [tokenizer.eos_token_id])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(seed)
    with torch.no_grad():
        out = lm.generate(
            input_ids=input_ids,
            attention_mask=attention,
            do_sample=True,
            top_k=0,
            top_p=1.0,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            eos_token_id=sorted(eos_ids),
        )
    completions = []
    for row in out[:, width:].tolist():
        ids = []
        for token in row:
            ids.append(token)
            if token in eos_ids:
                break
        completions.append(ids)
    return completions, eos_ids


def task_family(name: str):
    """(LEVELS, task class) of a synthetic task family with graded levels."""
    if name == "wordplay":
        from gadiag_tasks.synthetic_words import LEVELS, SyntheticWords

        return LEVELS, SyntheticWords
    from gadiag_tasks.synthetic_math import LEVELS, SyntheticMath

    return LEVELS, SyntheticMath


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="math", choices=["math", "wordplay"], help="synthetic task family")
    parser.add_argument("--samples", type=int, default=40, help="problems (one completion each) per level")
    parser.add_argument("--levels", default=None, help="comma-separated levels (default: all of the task)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=40)
    parser.add_argument("--no-worked-example", action="store_true", help="ask the question alone (zero-shot)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="alias, .gguf file, folder or HF id")
    parser.add_argument("--prompt-format", default="auto", choices=("auto", "chat", "plain"))
    parser.add_argument("--examples", type=int, default=1, help="worked examples before the question")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--show", type=int, default=2, help="print this many completions per level")
    args = parser.parse_args(argv)
    LEVELS, task_class = task_family(args.task)
    levels = args.levels or ",".join(LEVELS)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    student = load_student(args.model, args.prompt_format)
    tokenizer, lm = student.tokenizer, student.model
    print(f"loaded student in {time.time() - started:.0f}s ({student.prompt_format} prompts)")

    rows = []
    for level in [part.strip() for part in levels.split(",") if part.strip()]:
        task = task_class(levels=[level], worked_example=not args.no_worked_example, examples=args.examples)
        problems = task.problems(args.samples, seed=args.seed)
        prompts = [student.encode_messages(task.student_messages(p)) for p in problems]
        t0 = time.time()
        completions, eos_ids = [], set()
        for start in range(0, len(prompts), args.batch_size):
            batch, eos_ids = generate(
                tokenizer, lm, prompts[start : start + args.batch_size], args.max_new_tokens,
                args.temperature, seed=args.seed * 1000 + start, eos_ids=student.eos_token_ids,
            )
            completions += batch
        texts = [tokenizer.decode(c, skip_special_tokens=True) for c in completions]
        passed = [task.verify(p, t) for p, t in zip(problems, texts)]
        k, n = sum(passed), len(passed)
        lo, hi = wilson(k, n)
        tokens = sum(len(c) for c in completions) / max(n, 1)
        cut = sum(1 for c in completions if not c or c[-1] not in eos_ids) / max(n, 1)
        rows.append((level, LEVELS[level].description, k, n, lo, hi, tokens, cut, time.time() - t0))
        for p, t, ok in list(zip(problems, texts, passed))[: args.show]:
            print(f"  [{level}] {p.question!r} gold={p.answer} {'PASS' if ok else 'fail'}: {t.strip()[:120]!r}")

    print()
    print(f"pass rates: {args.model} ({student.prompt_format} prompts), temperature {args.temperature}, "
          f"{'zero-shot' if args.no_worked_example else f'{args.examples} worked example(s)'}, seed {args.seed}, "
          f"max_new_tokens {args.max_new_tokens}")
    print(f"{'level':<6}{'pass':>6}{'n':>5}  {'95% CI':<13}{'tokens':>7}{'cut':>6}{'secs':>6}  description")
    for level, desc, k, n, lo, hi, tokens, cut, secs in rows:
        print(f"{level:<6}{k / max(n, 1):>6.2f}{n:>5}  [{lo:.2f}, {hi:.2f}]  {tokens:>7.1f}{cut:>6.2f}{secs:>6.0f}  {desc}")
    print(f"total {time.time() - started:.0f}s")


if __name__ == "__main__":
    main()
