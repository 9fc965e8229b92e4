"""Throughput and peak-memory benchmark of the HF <-> cptron checkpoint conversion.

    python benchmarks/convert.py [--target-gb 1.2] [--max-shard-mb 300] [--workdir DIR] [--keep]

What it does:

1. Writes a synthetic HF `LlamaForCausalLM` checkpoint straight to disk (config.json,
   safetensors shards, model.safetensors.index.json). The safetensors files are
   produced by this script's own writer from seeded numpy chunks, so no model is
   instantiated and the benchmark process itself stays small.
2. Times a plain sequential read of the input shards (64 MB chunks into one reused
   buffer): the disk/page-cache ceiling the conversions are compared against.
3. Runs `convert_hf_to_cptron` and then `convert_cptron_to_hf` (same max shard size
   as the input), each in a fresh child process. The child imports torch, cptron and
   transformers, records its RSS (the baseline), resets the kernel's peak-RSS counter
   (/proc/self/clear_refs) and converts; the peak reported is the kernel's VmHWM
   after the conversion, cross-checked by polling the child from this process.
4. Checks the round trip hf -> cptron -> hf: same tensor names, shapes and dtypes for
   every tensor, and bit-identical bytes on a sample of tensors.

Before the plain read and before each conversion the page cache is dropped
(`sync; echo 3 > /proc/sys/vm/drop_caches`, needs root) so all three start cold; the
output says whether that worked. Sizes are in MB = 10^6 bytes.

Memory budget per direction: largest shard + 2 x largest tensor + 600 MB, compared
with the RSS the conversion adds on top of the child's post-import baseline
(`--budget-basis absolute` compares the whole peak RSS instead). Exit status: 0 when
both directions fit the budget and the round trip is bit-identical, 1 otherwise,
2 when a conversion child fails.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

MB = 10**6
READ_CHUNK = 64 * 2**20
RESULT_TAG = "CONVERT_BENCH_RESULT "
SAFETENSORS_DTYPES = {"F32": 4, "BF16": 2, "F16": 2, "F64": 8}

# ------------------------------------------------------------ synthetic checkpoint


@dataclass
class Shape:
    hidden: int = 2048
    heads: int = 32
    kv_heads: int = 8
    intermediate: int = 5632
    vocab: int = 32000

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def layer_tensors(self, i: int) -> list[tuple[str, tuple[int, ...]]]:
        h, kv = self.hidden, self.kv_heads * self.head_dim
        p = f"model.layers.{i}."
        return [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (self.intermediate, h)),
            (p + "mlp.up_proj.weight", (self.intermediate, h)),
            (p + "mlp.down_proj.weight", (h, self.intermediate)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]

    def tensors(self, n_layers: int) -> list[tuple[str, tuple[int, ...]]]:
        """HF tensor names and shapes in the order save_pretrained writes them."""
        out = [("model.embed_tokens.weight", (self.vocab, self.hidden))]
        for i in range(n_layers):
            out += self.layer_tensors(i)
        out += [("model.norm.weight", (self.hidden,)), ("lm_head.weight", (self.vocab, self.hidden))]
        return out

    def layers_for(self, target_bytes: int) -> int:
        """Smallest layer count whose fp32 weights reach `target_bytes`."""
        fixed = 4 * (2 * self.vocab * self.hidden + self.hidden)
        per_layer = 4 * sum(math.prod(s) for _, s in self.layer_tensors(0))
        return max(1, math.ceil((target_bytes - fixed) / per_layer))

    def hf_config(self, n_layers: int) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": self.hidden, "intermediate_size": self.intermediate,
            "num_hidden_layers": n_layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "head_dim": self.head_dim, "vocab_size": self.vocab,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
            "initializer_range": 0.02, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
        }


def plan_shards(tensors: list[tuple[str, tuple[int, ...]]], max_bytes: int) -> list[list[tuple[str, tuple]]]:
    """Greedy split in order, a new shard whenever the next tensor would overflow (as HF does)."""
    shards: list[list] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = 4 * math.prod(shape)
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def write_safetensors_f32(path: Path, tensors: list[tuple[str, tuple[int, ...]]], rng, buf) -> None:
    """Write fp32 tensors in safetensors layout, filling them chunk by chunk from `rng`
    (at most `buf` is in memory). Norm weights are 1 + noise, matrices uniform +-0.05."""
    import numpy as np

    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        nbytes = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape in tensors:
            left = math.prod(shape)
            is_norm = len(shape) == 1
            while left:
                n = min(left, buf.size)
                chunk = buf[:n]
                rng.random(out=chunk, dtype=np.float32)
                chunk -= 0.5
                chunk *= 0.02 if is_norm else 0.1
                if is_norm:
                    chunk += 1.0
                f.write(memoryview(chunk).cast("B"))
                left -= n


def build_hf_checkpoint(out: Path, shape: Shape, n_layers: int, max_shard_bytes: int, seed: int) -> dict:
    import numpy as np

    out.mkdir(parents=True)
    tensors = shape.tensors(n_layers)
    shards = plan_shards(tensors, max_shard_bytes)
    rng = np.random.Generator(np.random.PCG64(seed))
    buf = np.empty(8 * 2**20, dtype=np.float32)  # 32 MB, reused for every chunk
    weight_map, total = {}, 0
    for i, group in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors_f32(out / fname, group, rng, buf)
        for name, s in group:
            weight_map[name] = fname
            total += 4 * math.prod(s)
    del buf
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(shape.hf_config(n_layers), indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return {"n_tensors": len(tensors), "n_shards": len(shards), "tensor_bytes": total}


# -------------------------------------------------------------- safetensors headers


def read_header(path: Path) -> tuple[dict, int]:
    """(tensor name -> {dtype, shape, data_offsets}, byte offset of the data section)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def hf_dir_tensors(d: Path) -> dict[str, tuple[Path, dict, int]]:
    """Tensor name -> (file, header entry, data start) over every safetensors file of an HF dir."""
    index = d / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]
    out = {}
    for fname in files:
        header, start = read_header(d / fname)
        for name, entry in header.items():
            out[name] = (d / fname, entry, start)
    return out


def shard_stats(d: Path) -> tuple[int, int, int]:
    """(sum of tensor bytes, largest shard's tensor bytes, largest tensor bytes) of an HF dir."""
    per_file: dict[Path, int] = {}
    largest_tensor = 0
    for path, entry, _ in hf_dir_tensors(d).values():
        a, b = entry["data_offsets"]
        per_file[path] = per_file.get(path, 0) + (b - a)
        largest_tensor = max(largest_tensor, b - a)
    return sum(per_file.values()), max(per_file.values()), largest_tensor


# ------------------------------------------------------------------- page cache


def _cached_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1]) * 1024 / MB
    return float("nan")


def drop_caches(enabled: bool) -> str:
    """Try to empty the page cache; returns a line saying what happened."""
    if not enabled:
        return "not dropped (--no-drop-caches)"
    before = _cached_mb()
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        return f"NOT dropped ({e.strerror}); timings may be warm"
    return f"dropped (page cache {before:.0f} -> {_cached_mb():.0f} MB)"


def plain_read(files: list[Path]) -> tuple[int, float]:
    buf = bytearray(READ_CHUNK)
    view = memoryview(buf)
    total = 0
    t0 = time.perf_counter()
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total, time.perf_counter() - t0


# ---------------------------------------------------------------- child process


def _proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem in bytes (absent keys omitted)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(rest.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def worker(direction: str, src: str, dst: str, max_shard_size: str) -> None:
    """Runs in the child: import, measure baseline, reset peak, convert, report JSON on stdout."""

    from cptron import hf

    base = _proc_status()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    t0 = time.perf_counter()
    if direction == "hf-to-cptron":
        hf.convert_hf_to_cptron(src, dst, progress=False)
    else:
        hf.convert_cptron_to_hf(src, dst, max_shard_size=max_shard_size, progress=False)
    secs = time.perf_counter() - t0
    end = _proc_status()
    result = {"seconds": secs, "baseline_rss": base.get("VmRSS", 0), "baseline_anon": base.get("RssAnon", 0),
              "baseline_file": base.get("RssFile", 0), "hwm": end.get("VmHWM", 0), "hwm_reset": reset,
              "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "end_rss": end.get("VmRSS", 0)}
    sys.stdout.write(RESULT_TAG + json.dumps(result) + "\n")
    sys.stdout.flush()


@dataclass
class Poll:
    peak_rss: int = 0
    peak_anon: int = 0
    peak_file: int = 0
    samples: int = 0
    timeline: list = field(default_factory=list)


def _poll(pid: int, stop: threading.Event, interval: float, out: Poll) -> None:
    """Samples the child and its descendants until `stop`; RSS summed over the tree."""
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    pids = [pid]
    last_scan = 0.0
    t0 = time.perf_counter()
    while not stop.is_set():
        now = time.perf_counter()
        if now - last_scan > 0.5:
            try:
                pids = [pid] + [c.pid for c in root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            last_scan = now
        rss = anon = filed = 0
        for p in pids:
            s = _proc_status(p)
            rss += s.get("VmRSS", 0)
            anon += s.get("RssAnon", 0)
            filed += s.get("RssFile", 0)
        if rss:
            out.peak_rss = max(out.peak_rss, rss)
            out.peak_anon = max(out.peak_anon, anon)
            out.peak_file = max(out.peak_file, filed)
            out.samples += 1
            out.timeline.append((now - t0, rss, anon, filed))
        stop.wait(interval)


def run_child(direction: str, src: Path, dst: Path, max_shard_size: str, interval: float) -> tuple[dict, Poll]:
    cmd = [sys.executable, os.path.abspath(__file__), "--_worker", direction, str(src), str(dst), max_shard_size]
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    poll, stop = Poll(), threading.Event()
    th = threading.Thread(target=_poll, args=(proc.pid, stop, interval, poll), daemon=True)
    th.start()
    out, err = proc.communicate()
    stop.set()
    th.join()
    for line in out.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):]), poll
    raise RuntimeError(f"{direction} child exited with status {proc.returncode}:\n{out}\n{err}")


# ----------------------------------------------------------------- verification


def verify_round_trip(src: Path, dst: Path, sample: int, seed: int) -> tuple[bool, list[str]]:
    """Names/shapes/dtypes of all tensors, bytes of a sample; returns (ok, report lines)."""
    a, b = hf_dir_tensors(src), hf_dir_tensors(dst)
    lines, ok = [], True
    if set(a) != set(b):
        ok = False
        lines.append(f"tensor names differ: only in input {sorted(set(a) - set(b))[:5]}, "
                     f"only in output {sorted(set(b) - set(a))[:5]}")
    common = sorted(set(a) & set(b))
    meta_bad = [n for n in common if (a[n][1]["dtype"], a[n][1]["shape"]) != (b[n][1]["dtype"], b[n][1]["shape"])]
    if meta_bad:
        ok = False
        lines.append(f"{len(meta_bad)} tensors differ in dtype/shape, e.g. {meta_bad[0]}: "
                     f"{a[meta_bad[0]][1]} vs {b[meta_bad[0]][1]}")
    lines.append(f"headers: {len(common)} tensors in both, {len(meta_bad)} dtype/shape mismatches")

    # Always the largest and the odd ones (embeddings, head, norms, first/last layer), plus random picks.
    layers = sorted({int(n.split(".")[2]) for n in common if n.startswith("model.layers.")})
    must = [n for n in common if not n.startswith("model.layers.")]
    if layers:
        must += [n for n in common if n.startswith((f"model.layers.{layers[0]}.", f"model.layers.{layers[-1]}."))]
    rest = [n for n in common if n not in must]
    if sample < 0:
        picks = common
    else:
        picks = sorted(set(must) | set(random.Random(seed).sample(rest, min(sample, len(rest)))))
    differing, checked = [], 0
    for name in picks:
        if name in meta_bad:
            continue
        (pa, ea, sa), (pb, eb, sb) = a[name], b[name]
        n = ea["data_offsets"][1] - ea["data_offsets"][0]
        with open(pa, "rb") as fa, open(pb, "rb") as fb:
            fa.seek(sa + ea["data_offsets"][0])
            fb.seek(sb + eb["data_offsets"][0])
            left = n
            while left:
                k = min(left, READ_CHUNK)
                if fa.read(k) != fb.read(k):
                    differing.append(name)
                    break
                left -= k
        checked += n
    if differing:
        ok = False
    lines.append(f"bytes: {len(picks)} of {len(common)} tensors compared ({checked / MB:.0f} MB), "
                 f"{len(differing)} differ" + (f": {differing[:5]}" if differing else " (bit-identical)"))
    ca, cb = json.loads((src / "config.json").read_text()), json.loads((dst / "config.json").read_text())
    keys = ["architectures", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "tie_word_embeddings", "rms_norm_eps"]
    cfg_bad = [k for k in keys if ca.get(k) != cb.get(k)]
    if cfg_bad:
        ok = False
    lines.append("config.json: " + (f"differs in {cfg_bad}" if cfg_bad else "architecture fields identical"))
    return ok, lines


# ------------------------------------------------------------------------- main


def _dir_bytes(d: Path, suffix: str | None = None) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file() and (suffix is None or p.name.endswith(suffix)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target-gb", type=float, default=1.2,
                    help="fp32 weight bytes to reach, in GB (10^9); sets the layer count (default 1.2)")
    ap.add_argument("--max-shard-mb", type=int, default=300,
                    help="max input shard size and cptron-to-hf max_shard_size, in MB (default 300)")
    ap.add_argument("--workdir", default=None, help="parent of the temp dir (default: system temp, /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verify-sample", type=int, default=8,
                    help="random tensors byte-compared besides embeddings/head/norms/first+last layer; -1: all")
    ap.add_argument("--no-drop-caches", action="store_true", help="do not try to drop the page cache")
    ap.add_argument("--budget-basis", choices=("conversion", "absolute"), default="conversion",
                    help="compare the budget with peak minus the child's post-import baseline (default) "
                         "or with the whole peak RSS")
    ap.add_argument("--poll-interval", type=float, default=0.01, help="seconds between RSS samples of the child")
    ap.add_argument("--timeline", action="store_true", help="print the sampled RSS of each child over time")
    ap.add_argument("--_worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._worker:
        worker(*args._worker)
        return 0

    shape = Shape()
    n_layers = shape.layers_for(int(args.target_gb * 1e9))
    max_shard = args.max_shard_mb * MB
    max_shard_size = f"{args.max_shard_mb}MB"
    drop = not args.no_drop_caches
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="cptron-convert-bench-", dir=args.workdir))
    hf_in, cp_dir, hf_out = work / "hf", work / "cptron", work / "hf-roundtrip"
    try:
        print(f"cptron conversion benchmark  (MB = 10^6 bytes; workdir {work})")
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
        t0 = time.perf_counter()
        info = build_hf_checkpoint(hf_in, shape, n_layers, max_shard, args.seed)
        build_s = time.perf_counter() - t0
        in_total, in_largest_shard, largest_tensor = shard_stats(hf_in)
        print(f"synthetic LlamaForCausalLM: hidden {shape.hidden}, {n_layers} layers, heads {shape.heads}/"
              f"{shape.kv_heads} kv, intermediate {shape.intermediate}, vocab {shape.vocab}, untied, fp32")
        print(f"  {info['n_tensors']} tensors, {info['tensor_bytes'] / MB:.0f} MB in {info['n_shards']} shards "
              f"(max {max_shard_size}; largest {in_largest_shard / MB:.0f} MB), largest tensor "
              f"{largest_tensor / MB:.0f} MB; written in {build_s:.1f} s")

        in_files = sorted(hf_in.glob("*.safetensors"))
        print()
        print(f"plain read: page cache {drop_caches(drop)}")
        read_bytes, read_s = plain_read(in_files)
        read_mbs = read_bytes / MB / read_s
        print(f"  {read_bytes / MB:.0f} MB in {read_s:.2f} s = {read_mbs:.0f} MB/s")

        results = {}
        steps = [("hf-to-cptron", hf_in, cp_dir), ("cptron-to-hf", cp_dir, hf_out)]
        for direction, src, dst in steps:
            print()
            print(f"{direction}: page cache {drop_caches(drop)}")
            res, poll = run_child(direction, src, dst, max_shard_size, args.poll_interval)
            if direction == "hf-to-cptron":
                nbytes, shard = in_total, in_largest_shard
            else:
                nbytes, shard, _ = shard_stats(hf_out)
            budget = shard + 2 * largest_tensor + 600 * MB
            peak = res["hwm"] if res["hwm_reset"] else res["ru_maxrss"]
            added = peak - res["baseline_rss"]
            judged = added if args.budget_basis == "conversion" else peak
            passed = judged <= budget
            mbs = nbytes / MB / res["seconds"]
            results[direction] = (mbs, passed)
            print(f"  total bytes      {nbytes} ({nbytes / MB:.0f} MB)"
                  + (f"; DCP dir on disk {_dir_bytes(cp_dir) / MB:.0f} MB" if direction == "hf-to-cptron" else ""))
            print(f"  seconds          {res['seconds']:.2f}")
            print(f"  throughput       {mbs:.0f} MB/s")
            print(f"  child baseline   {res['baseline_rss'] / MB:.0f} MB RSS after importing torch, transformers, "
                  f"cptron (anon {res['baseline_anon'] / MB:.0f}, file {res['baseline_file'] / MB:.0f})")
            src_note = "VmHWM after reset at baseline" if res["hwm_reset"] else "ru_maxrss (peak reset failed)"
            print(f"  peak RSS         {peak / MB:.0f} MB ({src_note}); conversion adds {added / MB:.0f} MB")
            print(f"  sampled peak     {poll.peak_rss / MB:.0f} MB over {poll.samples} samples "
                  f"(anon max {poll.peak_anon / MB:.0f}, file-backed max {poll.peak_file / MB:.0f}); "
                  f"ru_maxrss {res['ru_maxrss'] / MB:.0f} MB")
            print(f"  budget           {budget / MB:.0f} MB = largest shard {shard / MB:.0f} + 2 x largest tensor "
                  f"{largest_tensor / MB:.0f} + 600")
            print(f"  memory           {'PASS' if passed else 'FAIL'}: "
                  f"{'conversion RSS' if args.budget_basis == 'conversion' else 'peak RSS'} "
                  f"{judged / MB:.0f} MB {'<=' if passed else '>'} budget {budget / MB:.0f} MB "
                  f"(whole-process peak {peak / MB:.0f} MB {'<=' if peak <= budget else '>'} budget)")
            if args.timeline:
                step = max(1, len(poll.timeline) // 40)
                for t, rss, anon, filed in poll.timeline[::step]:
                    print(f"    t={t:6.2f}s rss {rss / MB:6.0f}  anon {anon / MB:6.0f}  file {filed / MB:6.0f}")

        print()
        print("round trip hf -> cptron -> hf:")
        rt_ok, lines = verify_round_trip(hf_in, hf_out, args.verify_sample, args.seed)
        for line in lines:
            print(f"  {line}")
        print(f"  {'PASS' if rt_ok else 'FAIL'}")

        print()
        print(f"plain read        {read_mbs:.0f} MB/s")
        for direction, (mbs, _) in results.items():
            print(f"{direction:<17} {mbs:.0f} MB/s = {mbs / read_mbs:.2f} x plain read")
        ok = rt_ok and all(p for _, p in results.values())
        print(f"overall: {'PASS' if ok else 'FAIL'}")
        return 0 if ok else 1
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
