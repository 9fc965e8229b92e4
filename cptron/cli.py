"""The `cptron` command. Each subcommand reads one typed config and works on its own files.

    cptron init            random-initialized cptron checkpoint from a model preset
    cptron convert hf-to-cptron | cptron-to-hf | verify
    cptron data tokenize   text (jsonl, jsonl.gz, parquet, txt) -> Megatron .bin/.idx token shards
    cptron data plan       a train config's data: sources, mixture per stage, samples and epochs (builds the index cache)
    cptron train           continual pretraining with any mix of TP/SP, PP and sharded DP (torchrun for >1 process)
    cptron plan            each rank's memory for a train config (params, grads, optimizer, activations), and layouts that fit
    cptron lr-plot         the LR of a train config per step, phases marked (and a branch's parent schedule) in a PNG
    cptron plot            loss curves of runs (training per source, validation per set, forgetting) in one PNG
    cptron vocab extend    tokenizer + target-language tokens (SentencePiece or byte-level BPE) and a fertility report
    cptron vocab init      HF model resized to an extended tokenizer: old rows bit-exact, new rows initialized
    cptron vocab vectors   word vectors trained on text: monolingual, a tokenizer's tokens, or multilingual from aligned text

`cptron <command> --help` lists every field with its docstring and default.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.distributed as dist

from cptron import __version__
from cptron import checkpoint as ckpt
from cptron.config import config_to_dict, dump_yaml, parse_config
from cptron.data.build import build_data_loaders
from cptron.data.tokenize import TokenizeConfig, run_tokenize
from cptron.deepspeed_config import DEEPSPEED_COMMANDS, DEEPSPEED_HELP, parse_with_deepspeed_config
from cptron.errors import ConfigError, CptronError, require
from cptron.hf import compare_export, convert_cptron_to_hf, convert_hf_to_cptron, parse_size, tokenizer_files
from cptron.models.config import ModelConfig
from cptron.models.factorized import describe_parameters
from cptron.models.llama import Transformer, build_model
from cptron.train.branch import architecture_source, plan_branch_data
from cptron.train.checkpointer import TrainCheckpointer
from cptron.train.config import JobConfig
from cptron.train.initial_weights import model_config_for_init, run_tokenizer_dir
from cptron.train.lr_plot import LRPlotConfig, lr_plot_arguments, run_lr_plot
from cptron.train.memory_plan import PlanConfig, run_plan
from cptron.train.plot_runs import PlotConfig, plot_arguments, run_plot
from cptron.vocab.extend import VocabExtendConfig, run_vocab_extend
from cptron.vocab.init import VocabInitConfig, run_vocab_init
from cptron.vocab.vectors_train import VocabVectorsConfig, run_vocab_vectors

log = logging.getLogger("cptron")

DType = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass
class InitConfig:
    """Write a randomly initialized cptron checkpoint (training from scratch, tests, demos)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture of the model to create."""
    output: str = ""
    """Checkpoint directory to write."""
    seed: int = 0
    """Initialization seed; the weights are a function of (seed, parameter name) only."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the stored weights."""
    tokenizer: Optional[str] = None
    """Directory whose tokenizer files are carried in the checkpoint (copied into an HF export)."""
    overwrite: bool = False
    """Replace `output` if it exists."""
    dry_run: bool = False
    """Print the parameter counts (embedding and head, factorized vs full) and write nothing; the model is built on the meta device only."""

    def validate(self) -> None:
        require(self.dry_run or bool(self.output), "output", self.output, "a directory path")
        require(
            self.tokenizer is None or Path(self.tokenizer).is_dir(),
            "tokenizer",
            self.tokenizer,
            "an existing directory",
        )


@dataclass
class HFToCptronConfig:
    """Convert a Hugging Face model directory (safetensors) into a cptron checkpoint."""

    input: str = ""
    """HF model directory (config.json plus model.safetensors or a sharded index)."""
    output: str = ""
    """cptron checkpoint directory to write."""
    pad_vocab_to_multiple_of: int = 1
    """Pad embedding/output rows to a multiple of this (e.g. 128 for tensor parallelism); removed on export."""
    dtype: DType = "auto"
    """Dtype of the stored weights; auto keeps each tensor's dtype."""
    embedding_rank: Optional[int] = None
    """Store the input embedding factorized at this rank (embedding_factors.safetensors when its rank matches, else truncated SVD); None keeps it full."""
    factorize_head: bool = False
    """Store the LM head factorized too (needs embedding_rank)."""
    overwrite: bool = False
    """Replace `output` if it exists."""
    progress: bool = True
    """Show a progress bar."""

    def validate(self) -> None:
        require(bool(self.input), "input", self.input, "an HF model directory")
        require(
            self.embedding_rank is None or self.embedding_rank >= 1,
            "embedding_rank",
            self.embedding_rank,
            "None or an integer >= 1",
        )
        require(
            not self.factorize_head or self.embedding_rank is not None,
            "factorize_head",
            self.factorize_head,
            "false unless embedding_rank is set",
        )
        require(Path(self.input).is_dir(), "input", self.input, "an existing directory")
        require(bool(self.output), "output", self.output, "a directory path")
        require(
            self.pad_vocab_to_multiple_of >= 1,
            "pad_vocab_to_multiple_of",
            self.pad_vocab_to_multiple_of,
            "an integer >= 1",
        )


@dataclass
class CptronToHFConfig:
    """Export a cptron checkpoint as a Hugging Face model directory."""

    input: str = ""
    """cptron checkpoint directory (a complete one: it has a COMPLETE marker)."""
    output: str = ""
    """HF model directory to write."""
    dtype: DType = "auto"
    """Dtype of the exported weights; auto keeps the stored dtype."""
    max_shard_size: str = "5GB"
    """Largest safetensors shard, e.g. 5GB or 500MB."""
    overwrite: bool = False
    """Replace `output` if it exists."""
    progress: bool = True
    """Show a progress bar."""

    def validate(self) -> None:
        require(bool(self.input), "input", self.input, "a cptron checkpoint directory")
        require(bool(self.output), "output", self.output, "a directory path")
        try:
            size = parse_size(self.max_shard_size)
        except CptronError as e:
            raise ConfigError(f"max_shard_size={self.max_shard_size!r} is invalid: {e}") from e
        require(size > 0, "max_shard_size", self.max_shard_size, "a size > 0")


@dataclass
class VerifyConfig:
    """Check that an HF export reproduces the cptron checkpoint's logits under transformers."""

    checkpoint: str = ""
    """cptron checkpoint directory."""
    hf: str = ""
    """HF model directory (e.g. written by `cptron convert cptron-to-hf`)."""
    batch_size: int = 2
    """Sequences in the probe batch."""
    seq_len: int = 64
    """Tokens per probe sequence."""
    seed: int = 0
    """Seed of the random probe tokens."""
    tolerance: float = 1e-5
    """Largest allowed absolute logit difference; both models run in float32, cptron's weights rounded to the
    export's dtype (e.g. bf16) as the export rounds them, so the default fits every export dtype."""

    def validate(self) -> None:
        require(bool(self.checkpoint), "checkpoint", self.checkpoint, "a cptron checkpoint directory")
        require(Path(self.checkpoint).is_dir(), "checkpoint", self.checkpoint, "an existing directory")
        require(Path(self.hf).is_dir(), "hf", self.hf, "an existing HF model directory")
        require(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        require(self.seq_len >= 1, "seq_len", self.seq_len, "an integer >= 1")
        require(self.tolerance >= 0, "tolerance", self.tolerance, "a float >= 0")


# ------------------------------------------------------------------ commands


def run_init(cfg: InitConfig) -> None:
    if cfg.dry_run:
        cfg.model.validate()
        with torch.device("meta"):  # counted from the modules themselves, nothing allocated
            counted = sum(p.numel() for p in Transformer(cfg.model).parameters())
        print(f"{cfg.model.preset or cfg.model.family}: {describe_parameters(cfg.model)}; counted {counted:,}")
        return
    dtype = getattr(torch, cfg.dtype)
    model = build_model(cfg.model, seed=cfg.seed, dtype=dtype)
    log.info(
        "initialized %s model (%s, %s) with seed %d on cpu",
        cfg.model.preset or cfg.model.family,
        describe_parameters(cfg.model),
        cfg.dtype,
        cfg.seed,
    )
    tok_files = tokenizer_files(Path(cfg.tokenizer)) if cfg.tokenizer else []
    params = {name: p.detach() for name, p in model.named_parameters()}
    meta = {"model": config_to_dict(cfg.model), "step": 0, "source": f"init(seed={cfg.seed})"}
    out = ckpt.write_checkpoint(cfg.output, {"model": params}, meta, tokenizer_files=tok_files, overwrite=cfg.overwrite)
    log.info("wrote %s", out)


def run_hf_to_cptron(cfg: HFToCptronConfig) -> None:
    out = convert_hf_to_cptron(
        cfg.input,
        cfg.output,
        pad_vocab_to_multiple_of=cfg.pad_vocab_to_multiple_of,
        dtype=cfg.dtype,
        overwrite=cfg.overwrite,
        progress=cfg.progress,
        embedding_rank=cfg.embedding_rank,
        factorize_head=cfg.factorize_head,
    )
    log.info("wrote cptron checkpoint %s", out)


def run_cptron_to_hf(cfg: CptronToHFConfig) -> None:
    out = convert_cptron_to_hf(
        cfg.input,
        cfg.output,
        dtype=cfg.dtype,
        max_shard_size=cfg.max_shard_size,
        overwrite=cfg.overwrite,
        progress=cfg.progress,
    )
    log.info("wrote Hugging Face model %s", out)


def run_verify(cfg: VerifyConfig) -> float:
    result = compare_export(cfg.checkpoint, cfg.hf, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed)
    diff, dtypes = result.diff, "/".join(result.dtypes)
    verdict = "OK" if diff <= cfg.tolerance else "MISMATCH"
    # Identical numbers: no weight was rounded (the export keeps the checkpoint's dtype).
    rounded = result.rounding != diff
    print(
        f"max |logits(cptron) - logits(transformers)| = {diff:.3e}"
        + (f" with cptron's weights rounded to the export's {dtypes}" if rounded else "")
        + f" (tolerance {cfg.tolerance:.0e}): {verdict}"
        + (f"; rounding to {dtypes} itself moves the logits by up to {result.rounding:.3e}" if rounded else "")
    )
    if diff > cfg.tolerance:
        raise SystemExit(1)
    return diff


def run_train(cfg: JobConfig) -> None:
    # Deferred: the trainer imports torch.distributed.pipelining (about 0.7 s), which `cptron --help`,
    # conversion and data commands never need.
    from cptron.distributed import setup_distributed
    from cptron.train.trainer import EXIT_RESUMABLE, Trainer

    trainer = None
    try:
        # The group first, with the peer timeout and heartbeats; the trainer joins the group it finds.
        setup_distributed(cfg.training.device, cfg.parallel.peer_timeout_minutes)
        trainer = Trainer(cfg)
        if trainer.rank == 0:
            Path(cfg.training.run_dir).mkdir(parents=True, exist_ok=True)
            dump_yaml(cfg, str(Path(cfg.training.run_dir) / "config.yaml"))
        result = trainer.run()
        if trainer.rank == 0 and result.losses:  # no losses: it had finished already, and said so
            last = result.losses.get(result.last_step - 1)
            log.info(
                "%s at step %d%s",
                "finished" if result.stopped_by is None else f"stopped ({result.stopped_by})",
                result.last_step,
                f", last loss {last:.4f}" if last is not None else "",
            )
    finally:
        if trainer is not None:  # released already unless an error came between set-up and run
            trainer.close()
            # Background work ends before its process groups: a pending async save was waited for
            # (unless an error made that unsafe), and its gloo group goes before the default one.
            trainer.checkpointer.destroy_async_group()
        if dist.is_initialized():
            dist.destroy_process_group()  # every group: the default one and all subgroups
        # The groups' C++ objects (held by the model parts, the mesh, the checkpointer) are freed
        # now, while the interpreter is whole: freed during its shutdown, their worker threads
        # can abort the process ("terminate called without an active exception").
        trainer = None
        gc.collect()
    if result.stopped_by is not None:
        raise SystemExit(EXIT_RESUMABLE)


def run_data_plan(cfg: JobConfig) -> str:
    """Print what a training config's data section will feed the run, from its newest checkpoint if any."""
    t = cfg.training
    init_from = cfg.checkpoint.init_from
    arch = architecture_source(cfg)  # init_from; for a branch its own newest checkpoint, else its source
    model_cfg = model_config_for_init(arch, cfg.model.pad_vocab_to_multiple_of, cfg.model) if arch else cfg.model
    latest = TrainCheckpointer(cfg.checkpoint, t.run_dir, model_cfg=model_cfg).resume_path()
    branch = Path(cfg.checkpoint.branch_from) if cfg.checkpoint.branch_from and latest is None else None
    loader, validation = build_data_loaders(
        cfg.data,
        seq_len=t.seq_len,
        global_batch_size=t.global_batch_size,
        dp_rank=0,
        dp_size=1,
        vocab_size=model_cfg.vocab_size,
        seed=t.seed,
        total_steps=t.steps,
        tokenizer=run_tokenizer_dir(t.tokenizer, init_from, latest or branch),
    )
    lines = []
    if latest is not None:
        loader.load_state_dict(ckpt.read_meta(latest)["train_state"]["data"])
        lines.append(f"resuming from {latest} (step {loader.step})")
    elif branch is not None:
        lines.append(plan_branch_data(cfg, loader))
    lines.append(loader.describe_plan(t.steps))
    for name in validation:
        meta = loader.sources[loader.names.index(name)].meta
        batches = cfg.data.validation.num_batches
        if t.eval_batches:
            batches = min(batches, t.eval_batches)
        windows = min(meta["validation_windows"], batches * t.global_batch_size)
        lines.append(
            f"validation set {name}: {windows} samples from {meta['validation_documents']:,} held-out "
            f"documents ({-(-windows // t.global_batch_size)} batch(es))"
        )
    text = "\n".join(lines)
    print(text)
    return text


# ------------------------------------------------------------------ dispatch

# command path -> (config class, runner)
COMMANDS: dict[tuple[str, ...], tuple[type, Callable]] = {
    ("init",): (InitConfig, run_init),
    ("convert", "hf-to-cptron"): (HFToCptronConfig, run_hf_to_cptron),
    ("convert", "cptron-to-hf"): (CptronToHFConfig, run_cptron_to_hf),
    ("convert", "verify"): (VerifyConfig, run_verify),
    ("data", "tokenize"): (TokenizeConfig, run_tokenize),
    ("data", "plan"): (JobConfig, run_data_plan),
    ("train",): (JobConfig, run_train),
    ("lr-plot",): (LRPlotConfig, run_lr_plot),
    ("plan",): (PlanConfig, run_plan),
    ("plot",): (PlotConfig, run_plot),
    ("vocab", "extend"): (VocabExtendConfig, run_vocab_extend),
    ("vocab", "init"): (VocabInitConfig, run_vocab_init),
    ("vocab", "vectors"): (VocabVectorsConfig, run_vocab_vectors),
}

# The description of a command whose config class describes another command: `data plan` reads
# the train config, whose docstring is the train command's.
DESCRIPTIONS: dict[tuple[str, ...], str] = {
    ("data", "plan"): (
        "Show what a train config's data section feeds the run: sources, mixture per stage, samples "
        "and epochs, from its newest checkpoint if any (builds the sample-index cache)."
    ),
}

# Commands with argument forms of their own (`cptron plot RUN_DIR ... -o x.png`): a function that turns
# them into --field options, and whether a positional YAML config file is still read after that.
ARGUMENT_FORMS: dict[tuple[str, ...], tuple[Callable[[list[str]], list[str]], bool]] = {
    ("plot",): (plot_arguments, False),
    ("lr-plot",): (lr_plot_arguments, True),
}


def _description(path: tuple[str, ...], cls: type) -> str:
    return DESCRIPTIONS.get(path) or (cls.__doc__ or "").strip()


def _overview() -> str:
    lines = [
        f"cptron {__version__}: continual pretraining of Llama-family models",
        "",
        "usage: cptron <command> [CONFIG.yaml] [--section.field VALUE ...]",
        "",
        "commands:",
    ]
    for path, (cls, _) in COMMANDS.items():
        summary = _description(path, cls).splitlines()[0]
        lines.append(f"  {' '.join(path):<26} {summary}")
    lines += ["", "`cptron <command> --help` lists every field of a command."]
    return "\n".join(lines)


def _setup_logging() -> None:
    # Under torchrun every rank would print the same info lines: only global rank 0 logs INFO;
    # warnings and errors, which may concern one rank alone, show everywhere, naming the rank.
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    logging.basicConfig(
        level=logging.INFO if rank in (None, "0") else logging.WARNING,
        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _take_local_rank(argv: list[str]) -> list[str]:
    """`argv` without the `--local_rank N` / `--local_rank=N` (or `--local-rank`) that the deepspeed launcher
    puts before the command; the value becomes LOCAL_RANK where the launcher did not set it as well."""
    out, i = [], 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if name not in ("--local_rank", "--local-rank"):
            out.append(argv[i])
            i += 1
            continue
        if not eq:
            value = argv[i + 1] if i + 1 < len(argv) else ""
            i += 1
        i += 1
        require(value.isdigit(), "--local_rank", value, "a rank >= 0 (the launcher's local rank)")
        env = os.environ.get("LOCAL_RANK")
        require(env in (None, value), "--local_rank", value, f"the launcher's LOCAL_RANK={env}")
        os.environ["LOCAL_RANK"] = value
    return out


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = _take_local_rank(argv)
    except ConfigError as e:
        print(f"cptron: error: {e}", file=sys.stderr)
        return 2
    if not argv or argv[0] in ("-h", "--help"):
        print(_overview())
        return 0
    if argv[0] == "--version":
        print(f"cptron {__version__}")
        return 0
    for path, command in sorted(COMMANDS.items(), key=lambda kv: -len(kv[0])):
        if tuple(argv[: len(path)]) == path:
            cls, runner = command
            rest = argv[len(path) :]
            break
    else:
        if argv[0] in {p[0] for p in COMMANDS} and (len(argv) == 1 or argv[1] in ("-h", "--help")):
            print(_overview())
            return 0
        groups = sorted({p[0] for p in COMMANDS})
        print(
            f"cptron: unknown command {' '.join(argv[:2])!r}; expected one of: "
            + ", ".join(" ".join(p) for p in COMMANDS)
            + f" (groups: {', '.join(groups)})",
            file=sys.stderr,
        )
        return 2
    prog = "cptron " + " ".join(path)
    try:
        forms, positional_yaml = ARGUMENT_FORMS.get(path, (None, True))
        if forms is not None:
            rest = forms(rest)
        description = _description(path, cls)
        _setup_logging()  # before parsing: a DeepSpeed config logs each value it sets
        if path in DEEPSPEED_COMMANDS:  # --deepspeed_config ds.json: its values between the YAML file and the options
            description += "\n\n" + DEEPSPEED_HELP
            cfg = parse_with_deepspeed_config(cls, rest, prog=prog, description=description)
        else:
            cfg = parse_config(cls, rest, prog=prog, description=description, allow_positional_yaml=positional_yaml)
        runner(cfg)
    except CptronError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unwritable output, full disk, a file where a directory should be
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
