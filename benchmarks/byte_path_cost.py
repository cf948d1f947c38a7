"""Byte-path teacher cost per scored node against the id path, in one run.

The teacher is the student's own model shown the reference solution, scored
twice on the same rollouts and nodes: through the ids (one forward per
rollout, a row lookup per node) and through the bytes (gadiag_teachers.
byte_teacher: one forward of the re-tokenized text per rollout, then per node
the prefix marginal with healing and the greedy-longest-match partition on
the node's candidates, extra forwards off the canonical tokenization capped by
--max-forwards). Both on the same process and thread count; the ratio is
CPU seconds per scored node (time.process_time), wall seconds beside it.

It also prints how far the two paths disagree on the same model (DESIGN §5:
the byte path adds the mass the model puts on non-canonical tokenizations):
mean and max |Δ log p| of the sampled token (string probability vs id), the
covered teacher mass on the candidates and the mass the caps left out.

    python benchmarks/byte_path_cost.py --threads 1                 # SmolLM2, ~2 min on a busy core
    python benchmarks/byte_path_cost.py --teacher gemma3-270m       # cross-tokenizer: Gemma's byte path against SmolLM2's id path
"""

from __future__ import annotations

import argparse
import random
import time

import torch


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="the student (and the id-path teacher)")
    parser.add_argument("--teacher", default=None, help="another model for the byte path only (default: the student)")
    parser.add_argument("--rollouts", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--candidates", type=int, default=4, help="the student's top tokens per node (plus the sampled one)")
    parser.add_argument("--max-forwards", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from gadiag_core.interfaces import ContextInputs, RolloutView
    from gadiag_plugins.students.hf import load_lm
    from gadiag_tasks.synthetic_math import SyntheticMath
    from gadiag_teachers.byte_teacher import ByteTeacher
    from gadiag_teachers.contexts import SolutionContext
    from gadiag_teachers.model_teacher import ContextTeacher
    from gadiag_teachers.string_prob import Caps

    student = load_lm(args.model)
    teacher_lm = load_lm(args.teacher) if args.teacher else student
    task = SyntheticMath()
    problems = task.problems(args.rollouts, seed=args.seed)
    ids_teacher = ContextTeacher("ids", student, SolutionContext())  # the student's model through its ids: the reference
    byte_teacher = ByteTeacher("bytes", teacher_lm, SolutionContext(), student, Caps(max_forwards=args.max_forwards))

    torch.manual_seed(args.seed)
    cost = {"ids": [0.0, 0.0], "bytes": [0.0, 0.0]}  # [cpu, wall]
    nodes_total, gaps, covered, left_out, forwards = 0, [], [], [], 0
    for problem in problems:
        messages = task.student_messages(problem)
        prompt = student.encode_messages(messages)
        with torch.no_grad():
            out = student.model.generate(
                torch.tensor([prompt]), do_sample=True, top_k=0, top_p=1.0, max_new_tokens=args.max_new_tokens,
                eos_token_id=student.eos_token_ids, pad_token_id=student.eos_token_ids[0],
            )
        generated = out[0, len(prompt):].tolist()
        if generated and generated[-1] in student.eos_token_ids:
            pass
        inputs = ContextInputs(task, problem, messages, problems, [RolloutView(0, "", False)], 0, random.Random(0))
        z = student.node_logits(prompt, generated)
        lpi = torch.log_softmax(z, -1)
        nodes = list(range(len(generated)))
        cands = [torch.unique(torch.cat([lpi[t].topk(args.candidates).indices, torch.tensor([generated[t]])])) for t in nodes]
        sampled = torch.tensor(generated)
        nodes_total += len(nodes)

        if ids_teacher is not None:
            c0, w0 = time.process_time(), time.perf_counter()
            id_lp = ids_teacher.node_logprobs(inputs, generated)
            rows = torch.stack([id_lp[t, cands[t]].sum() for t in nodes])  # the per-node lookup the id path does
            cost["ids"][0] += time.process_time() - c0
            cost["ids"][1] += time.perf_counter() - w0
            del rows

        c0, w0 = time.process_time(), time.perf_counter()
        prepared = byte_teacher.prepare(inputs, generated)
        scores = byte_teacher.score(prepared, nodes, cands, sampled, lpi)
        cost["bytes"][0] += time.process_time() - c0
        cost["bytes"][1] += time.perf_counter() - w0
        forwards += scores.forwards
        covered += scores.covered.tolist()
        left_out += scores.left_out.tolist()
        if not args.teacher:
            gaps += (scores.sampled_logprobs - id_lp[torch.arange(len(nodes)), sampled]).abs().tolist()

    print(f"student {args.model}; byte-path teacher {args.teacher or args.model} shown the solution; "
          f"{len(problems)} rollouts, {nodes_total} scored nodes, ≤{args.candidates + 1} candidates each, "
          f"{args.threads} thread(s), max_forwards {args.max_forwards}")
    for path in ("ids", "bytes"):
        cpu, wall = cost[path]
        print(f"  {path:<6} {1000 * cpu / nodes_total:8.2f} ms CPU / node   {1000 * wall / nodes_total:8.2f} ms wall / node")
    print(f"  ratio bytes/ids: {cost['bytes'][0] / max(cost['ids'][0], 1e-9):.1f}x CPU, {cost['bytes'][1] / max(cost['ids'][1], 1e-9):.1f}x wall"
          + ("  (ids: the student's own model; bytes: the other teacher)" if args.teacher else ""))
    if not args.teacher:
        g = torch.tensor(gaps)
        print(f"  |Δ log p(sampled)| byte vs id path: mean {float(g.mean()):.4f}, median {float(g.median()):.4f}, max {float(g.max()):.3f}")
    print(f"  extra teacher forwards {forwards} ({forwards / nodes_total:.2f} / node); covered teacher mass mean "
          f"{sum(covered) / len(covered):.3f}; left out mean {sum(left_out) / len(left_out):.4f}, max {max(left_out):.4f}")


if __name__ == "__main__":
    main()
