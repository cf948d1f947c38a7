"""Parameter-space alignment: batched backward (gadiag_core.scoring.spaces) vs a Python
loop of full backward passes, on SmolLM2-135M-Instruct, in one run.

    /work/venv/bin/python benchmarks/param_alignment.py            # defaults below
    /work/venv/bin/python benchmarks/param_alignment.py --loop-nodes 6 --loop-question

The rollout is realistic: a chat-encoded math question (~120 tokens) and 40
tokens the student samples itself. Nodes: the N most uncertain generated
tokens (as the targeted estimator picks them). Vectors per node, as the
pipeline builds them: the ideal vector a* and its two halves (candidates = top
tokens + sampled token, Q̂ from 4 simulated continuations each), T mock
teachers (student logits plus noise) x {reverse_kl, sampled_token}, and
rl_outcome: 3 + 2T + 1 vectors (14 for T = 5). Pairs: (ideal, each teacher
row), (ideal, rl_outcome), (half0, half1).

Batched: `alignment_scores(space, ...)`, one forward, per-node rows of all nodes
in chunks of batched backward (is_grads_batched), then the per-question group.
With --no-rank it also runs without rank reduction (every vector
back-propagated), so the two sources of speed are reported apart.

Looped: the same forward, then one `torch.autograd.grad` of <z_t, v> per vector
and node over every selected parameter (head and embedding included), streaming
the needed dot products. It is slow (~1-3 s per backward on one CPU thread),
so by default only `--loop-nodes 1` node is looped and the per-node cost is
compared per node; the per-rollout estimate is extrapolated from it (and from
--loop-question if given). The looped cosines are checked against the batched
ones on the looped nodes; the loop's float32 dot products over whole parameter
tensors are good to ~2e-5 (the batched cosines agree with float64 dot
products of the same gradients to ~1e-7). Times are wall and process CPU
time: on a shared machine CPU time is the steadier figure.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from gadiag_plugins.students.hf import load_lm
from gadiag_core.scoring.spaces import alignment_scores, select_parameters, space_description
from gadiag_core.scoring.vectors import ideal_vector_on_candidates, policy, reverse_kl_vector, rl_outcome_vector, sampled_token_vector

QUESTION = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "Each clip costs $3, but in June she gave a discount of 25% on every clip and sold twice as many clips as in May. "
    "Her brother bought 7 clips in July at full price. How much money did Natalia earn in total from April to July? "
    "Explain your reasoning step by step and put the final answer after 'The answer is'."
)


def build_rollout(lm, prompt_tokens: int, generated: int, seed: int):
    messages = [{"role": "user", "content": QUESTION}]
    prompt = lm.encode_messages(messages)
    while len(prompt) < prompt_tokens:  # lengthen the question to the wanted size
        messages[0]["content"] += " Show every intermediate amount."
        prompt = lm.encode_messages(messages)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = lm.model.generate(
            torch.tensor([prompt]), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
            max_new_tokens=generated, min_new_tokens=generated, pad_token_id=lm.eos_token_ids[0],
        )
    return prompt, out[0, len(prompt):].tolist()


def build_vectors(lm, prompt, gen, n_nodes: int, n_teachers: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    tau = lm.temperature
    z = lm.node_logits(prompt, gen)  # [T, V]
    probs = policy(z, tau)
    spread = 1.0 - probs.max(-1).values
    nodes = torch.sort(spread.topk(n_nodes).indices).values
    sampled = torch.tensor(gen)[nodes]
    z_sel, p_sel = z[nodes], probs[nodes]
    N, V = z_sel.shape
    vectors = {k: torch.zeros(N, V) for k in ("ideal", "ideal_half0", "ideal_half1")}
    values = []
    for row in range(N):
        cands = list(dict.fromkeys(p_sel[row].topk(4).indices.tolist() + [int(sampled[row])]))
        cand = torch.tensor(cands)
        rewards = (torch.rand(len(cands), 4, generator=g) < torch.rand(len(cands), 1, generator=g)).float()
        halves = torch.stack([rewards[:, 0::2].mean(-1), rewards[:, 1::2].mean(-1)])
        ideal, value = ideal_vector_on_candidates(p_sel[row, cand], rewards.mean(-1), tau)
        ideal_h, _ = ideal_vector_on_candidates(p_sel[row, cand].expand(2, -1), halves, tau)
        vectors["ideal"][row, cand] = ideal
        vectors["ideal_half0"][row, cand] = ideal_h[0]
        vectors["ideal_half1"][row, cand] = ideal_h[1]
        values.append(float(value))
    pairs = {}
    for t in range(n_teachers):
        teacher = torch.log_softmax(z_sel + 2.0 * torch.randn(N, V, generator=g), -1)
        for name, vec in (
            ("reverse_kl", reverse_kl_vector(z_sel, teacher, tau)),
            ("sampled_token", sampled_token_vector(z_sel, teacher, sampled, tau)),
        ):
            vectors[f"teacher{t}/{name}"] = vec
            pairs[f"teacher{t}/{name}"] = ("ideal", f"teacher{t}/{name}")
    vectors["rl_outcome"] = rl_outcome_vector(p_sel, sampled, torch.tensor([1.0 - v for v in values]), tau)
    pairs["rl_outcome"] = ("ideal", "rl_outcome")
    pairs["noise_ceiling"] = ("ideal_half0", "ideal_half1")
    return nodes, vectors, pairs


class Clock:
    """Wall and process CPU time since start (CPU time is the steadier figure
    on a shared machine: other processes' load stretches wall time only)."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def looped(lm, space, prompt, gen, nodes, vectors, pairs, loop_nodes: int, loop_question: bool):
    """Brute force: one forward, then a Python loop of full backward passes,
    one per vector (and node), over every selected parameter; dot products per
    parameter tensor (float32), summed in float64."""
    model = lm.model
    params = [p for _, p in select_parameters(model, space)]
    flags = {p: p.requires_grad for p in model.parameters()}
    names = list(dict.fromkeys(n for pair in pairs.values() for n in pair))
    keep = {a for a, _ in pairs.values()}  # grads kept to dot with the others

    def dot(x, y):
        return sum(float(torch.dot(a.reshape(-1), b.reshape(-1))) for a, b in zip(x, y))

    try:
        for p in flags:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        clock = Clock()
        ids = torch.tensor([prompt + gen[:-1]])
        z = model(input_ids=ids, use_cache=False, logits_to_keep=len(gen)).logits[0][nodes]
        forward = clock.read()

        def run(objective_of):
            kept, sq, dots = {}, {}, {}
            for name in names:
                grads = torch.autograd.grad(objective_of(name), params, retain_graph=True)
                sq[name] = dot(grads, grads)
                for row, (a, b) in pairs.items():
                    if b == name and a in kept:
                        dots[row] = dot(kept[a], grads)
                    elif a == name and b in kept:
                        dots[row] = dot(kept[b], grads)
                if name in keep:
                    kept[name] = grads
                del grads
            return {row: dots[row] / (sq[a] * sq[b]) ** 0.5 for row, (a, b) in pairs.items()}

        per_node, node_times = [], []
        for n in range(loop_nodes):
            clock = Clock()
            per_node.append(run(lambda name, n=n: (z[n] * vectors[name][n]).sum()))
            node_times.append(clock.read())
        question, question_time = None, None
        if loop_question:
            clock = Clock()
            question = run(lambda name: (z * vectors[name]).sum())
            question_time = clock.read()
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return forward, per_node, node_times, question, question_time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--space", default="params")
    parser.add_argument("--prompt-tokens", type=int, default=120)
    parser.add_argument("--generated", type=int, default=40)
    parser.add_argument("--nodes", type=int, default=6)
    parser.add_argument("--teachers", type=int, default=5)
    parser.add_argument("--loop-nodes", type=int, default=1, help="nodes to loop over (each costs a full backward per vector)")
    parser.add_argument("--loop-question", action="store_true", help="also loop the per-question gradients")
    parser.add_argument("--no-rank", action="store_true", help="also run the batched path without rank reduction")
    parser.add_argument("--memory", default=None, help="gradient memory limit, e.g. 4GiB (default: $GADIAG_GRAD_MEMORY or 2GiB)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(f"torch {torch.__version__}, {args.threads} thread(s), load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")

    started = time.perf_counter()
    lm = load_lm(args.model)
    prompt, gen = build_rollout(lm, args.prompt_tokens, args.generated, args.seed)
    nodes, vectors, pairs = build_vectors(lm, prompt, gen, args.nodes, args.teachers, args.seed)
    K = len({n for pair in pairs.values() for n in pair})
    print(f"model {args.model}: {space_description(args.space, lm.model)}")
    print(f"rollout: prompt {len(prompt)} + generated {len(gen)} tokens; {len(nodes)} nodes x {K} vectors, {len(pairs)} pairs "
          f"(setup {time.perf_counter() - started:.1f} s)")

    runs = [("batched", True)] + ([("batched, no rank reduction", False)] if args.no_rank else [])
    results = {}
    for label, reduce in runs:
        stats, clock = {}, Clock()
        scores = alignment_scores(args.space, lm, prompt, gen, nodes, vectors, pairs, memory_limit=args.memory, reduce_rank=reduce, stats=stats)
        wall, cpu = clock.read()
        results[label] = (scores, stats, wall, cpu)
        print(
            f"{label}: wall {wall:.1f} s, cpu {cpu:.1f} s (forward {stats['forward_s']:.1f} s, per-node {stats['node_s']:.1f} s "
            f"for {stats['node_rows']} rows, per-question {stats['question_s']:.1f} s for {stats['question_rows']} rows; "
            f"{stats['backward_calls']} batched backward calls of <= {stats['capacity']} rows, {stats['row_bytes'] / 2**20:.0f} MiB per row)"
        )

    forward, per_node, node_times, question, question_time = looped(
        lm, args.space, prompt, gen, nodes, vectors, pairs, args.loop_nodes, args.loop_question
    )
    scores = results["batched"][0]
    err = max(abs(float(scores[row][0][n]) - per_node[n][row]) for n in range(len(per_node)) for row in pairs)
    if question is not None:
        err = max(err, max(abs(scores[row][1] - question[row]) for row in pairs))
    loop_wall = sum(w for w, _ in node_times) / len(node_times)
    loop_cpu = sum(c for _, c in node_times) / len(node_times)
    print(
        f"looped: forward {forward[0]:.1f} s, per node wall {loop_wall:.1f} s, cpu {loop_cpu:.1f} s "
        f"({K} full backward passes; {len(node_times)} node(s) timed)"
        + (f"; per-question wall {question_time[0]:.1f} s, cpu {question_time[1]:.1f} s" if question_time else "")
    )
    print(f"max |cos batched - cos looped| over the looped nodes{' and the question' if question else ''}: {err:.1e}")
    print()
    print("per-node cost (backward passes + Gram; the one shared forward excluded), ms per node:")
    print(f"  {'':28s} {'wall':>8s} {'cpu':>8s}   looped/batched (wall, cpu)")
    for label, (_, stats, wall, cpu) in results.items():
        node_wall = 1000 * stats["node_s"] / len(nodes)
        node_cpu = 1000 * stats["node_cpu_s"] / len(nodes)
        print(f"  {label:28s} {node_wall:8.0f} {node_cpu:8.0f}   {1000 * loop_wall / node_wall:.2f}x, {1000 * loop_cpu / node_cpu:.2f}x")
    print(f"  {'looped':28s} {1000 * loop_wall:8.0f} {1000 * loop_cpu:8.0f}")
    # Looped rollout: forward + every node + the per-question gradients (one
    # backward per vector, like one node, unless measured).
    q_wall, q_cpu = question_time if question_time else (loop_wall, loop_cpu)
    total_wall = forward[0] + len(nodes) * loop_wall + q_wall
    total_cpu = forward[1] + len(nodes) * loop_cpu + q_cpu
    print("per rollout (forward + all nodes + per-question), s:")
    for label, (_, stats, wall, cpu) in results.items():
        print(f"  {label:28s} {wall:8.1f} {cpu:8.1f}   {total_wall / wall:.2f}x, {total_cpu / cpu:.2f}x")
    print(f"  {'looped (extrapolated)':28s} {total_wall:8.1f} {total_cpu:8.1f}")
    load = os.getloadavg()
    print(f"load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
