"""Peak memory and time of forward+backward through the LM loss: chunked linear+cross-entropy vs plain.

    python benchmarks/loss_memory.py [--vocabs 32000,128256] [--seq 2048] [--hidden 2048] [--repeats 3]
                                     [--chunk-tokens 0]

Baseline: the plain path of the trainer (the head's nn.Linear gives the full logits, then
`cptron.train.loss.cross_entropy_sum`). Candidate: `cptron.train.chunked_loss.ChunkedHeadLoss`, the
path training.loss_impl=chunked runs. Both take the same fp32 inputs: hidden states [1, seq, hidden]
that require grad, a head [vocab, hidden] and random labels, and run loss.backward().

Peak memory: each (vocab, path) runs in a fresh child process. The child builds its inputs and runs
one small warm-up step (thread pools, allocator arenas), drops the gradients, reads its RSS (the
baseline), resets the kernel's peak-RSS counter (/proc/self/clear_refs, "5") and runs one full
forward+backward; the peak is the kernel's VmHWM minus the baseline, i.e. what forward+backward
adds, the head's weight gradient included (both paths create it; the ratio without it, the loss's
own transients, is printed beside). RSS and not tracemalloc: torch's CPU allocator does not go
through Python's allocator. glibc serves tensors this large with mmap,
and returns them on free, so RSS follows the live tensors.

Time: one more child per vocabulary runs the two paths alternately, `--repeats` times each
(alternating, so that load from other processes on a shared machine hits both alike), and the ratio
of medians is reported. Absolute times on shared CPUs are noise; the ratios are the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

TAG = "LOSS_BENCH "


def _inputs(vocab: int, seq: int, hidden: int):
    import torch

    g = torch.Generator().manual_seed(0)
    h = (torch.randn(1, seq, hidden, generator=g) * 0.5).requires_grad_(True)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.02, generator=g)
    labels = torch.randint(0, vocab, (1, seq), generator=g)
    return h, head, labels


def _step(path: str, h, head, labels, vocab: int, chunk: int) -> float:
    from cptron.train.chunked_loss import ChunkedHeadLoss
    from cptron.train.loss import cross_entropy_sum

    start = time.perf_counter()
    if path == "plain":
        loss = cross_entropy_sum(head(h), labels, vocab)
    else:
        loss, _ = ChunkedHeadLoss(vocab, chunk, sequence_parallel=False)(h, head, labels)
    loss.backward()
    elapsed = time.perf_counter() - start
    h.grad, head.weight.grad = None, None
    return elapsed


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child_memory(path: str, vocab: int, seq: int, hidden: int, chunk: int) -> dict:
    import torch

    torch.manual_seed(0)
    wh, whead, wl = _inputs(256, 64, 32)
    _step(path, wh, whead, wl, 256, 16)  # warm-up at a small size: no large tensor left behind
    h, head, labels = _inputs(vocab, seq, hidden)
    base = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    seconds = _step(path, h, head, labels, vocab, chunk)
    return {"peak_bytes": _status("VmHWM") - base, "seconds": seconds, "baseline_bytes": base}


def child_time(vocab: int, seq: int, hidden: int, chunk: int, repeats: int) -> dict:
    h, head, labels = _inputs(vocab, seq, hidden)
    _step("chunked", h, head, labels, vocab, chunk)
    _step("plain", h, head, labels, vocab, chunk)
    times: dict = {"plain": [], "chunked": []}
    for _ in range(repeats):
        for path in ("plain", "chunked"):
            times[path].append(_step(path, h, head, labels, vocab, chunk))
    return times


def run_child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{proc.stderr[-4000:]}")
    line = next(line for line in proc.stdout.splitlines() if line.startswith(TAG))
    return json.loads(line[len(TAG) :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocabs", default="32000,128256", help="comma-separated vocabulary sizes")
    p.add_argument("--seq", type=int, default=2048, help="tokens per microbatch (one sequence)")
    p.add_argument("--hidden", type=int, default=2048, help="hidden size")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per path, alternating (0: memory only)")
    p.add_argument("--chunk-tokens", type=int, default=0, help="tokens per chunk (0: the trainer's default)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        kind, *rest = a.child
        if kind == "memory":
            out = child_memory(rest[0], *map(int, rest[1:]))
        else:
            out = child_time(*map(int, rest))
        print(TAG + json.dumps(out), flush=True)
        return

    import torch

    from cptron.train.chunked_loss import resolve_loss_path

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, seq {a.seq}, hidden {a.hidden}")
    rows = []
    for vocab in map(int, a.vocabs.split(",")):
        chunk = resolve_loss_path("chunked", a.chunk_tokens, a.seq, vocab).chunk_tokens
        mem = {
            path: run_child(["memory", path, str(vocab), str(a.seq), str(a.hidden), str(chunk)])
            for path in ("plain", "chunked")
        }
        if a.repeats:
            times = run_child(["time", str(vocab), str(a.seq), str(a.hidden), str(chunk), str(a.repeats)])
        else:  # memory only: the one timed step of each memory child
            times = {path: [m["seconds"]] for path, m in mem.items()}
        med = {path: statistics.median(t) for path, t in times.items()}
        rows.append((vocab, chunk, mem, med))
        logits_gb = a.seq * vocab * 4 / 1e9
        print(
            f"vocab {vocab:>6} ({logits_gb:.2f} GB fp32 logits, chunk {chunk} tokens): peak plain "
            f"{mem['plain']['peak_bytes'] / 1e9:.2f} GB, chunked {mem['chunked']['peak_bytes'] / 1e9:.2f} GB; "
            f"median time plain {med['plain']:.2f} s, chunked {med['chunked']:.2f} s "
            f"(all: plain {' '.join(f'{t:.2f}' for t in times['plain'])}, "
            f"chunked {' '.join(f'{t:.2f}' for t in times['chunked'])})",
            flush=True,
        )
    print("\nratios, chunked / plain (memory: peak RSS added by forward+backward; time: median of alternating steps)")
    for vocab, chunk, mem, med in rows:
        plain, chunked = mem["plain"]["peak_bytes"], mem["chunked"]["peak_bytes"]
        grad_w = vocab * a.hidden * 4  # the head's fp32 weight gradient, which both paths create
        print(
            f"  vocab {vocab:>6}, seq {a.seq}, hidden {a.hidden}, chunk {chunk}: peak memory {chunked / plain:.3f}x "
            f"(without the {grad_w / 1e9:.2f} GB weight gradient: {(chunked - grad_w) / (plain - grad_w):.3f}x), "
            f"time {med['chunked'] / med['plain']:.3f}x"
        )


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    main()
