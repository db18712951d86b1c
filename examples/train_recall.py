"""Train a small Llama on long-context key-value recall with MoBA and with full attention.

Two models from one initialisation are trained side by side, step for step on the
same synthetic batches: one with ``attn_implementation="moba"`` (the native op,
see ``moba.register``), one with ``"sdpa"`` (PyTorch's full causal attention).
The per-step loss and recall accuracy of both go to ``<out-dir>/train_recall.json``
and a plot to ``<out-dir>/train_recall.png``, so one can see whether MoBA's curve
tracks full attention's.

The task (docs/training.md): a sequence holds ``--pairs`` key/value pairs at random
places among filler tokens; at its end every key is asked again, in a new order,
and the model must name its value. A pair occupies one position whose input is
the sum of the key's and the value's token embeddings (a query: the key's plus a
query marker's), so finding the pair that matches a query is one attention hop;
``--repeats`` states each pair several times within its stretch of the context, and
``--repeat-fraction`` states it over a passage (a contiguous run of positions) that
is a fixed fraction of that stretch, so the longer the sequence, the longer the passage.
Training starts on short sequences and grows them (``--stages``), because a model
that starts at thousands of tokens does not find the pairs at all in a few hundred
steps. Every batch is drawn fresh, so the training accuracy is also accuracy on
unseen sequences.

    python3 examples/train_recall.py --device cuda --out-dir /tmp/train       # up to 16K tokens
    python3 examples/train_recall.py --device cuda --repeats 4 --out-dir /tmp/train_r4
    python3 examples/train_recall.py --device cuda --repeat-fraction 0.0625 --out-dir /tmp/pf
    python3 examples/train_recall.py --device cpu --reduced --out-dir /tmp/r  # 1K tokens, minutes
    python3 examples/train_recall.py --device cpu --tiny --out-dir /tmp/tiny  # CI smoke run
    python3 examples/train_recall.py --plot-only /tmp/train/train_recall.json

Nothing is downloaded: the model is built from a LlamaConfig with random weights.
On CUDA the models compute in bfloat16 (the MoBA kernels take fp16/bf16; no
autocast) while AdamW updates float32 master weights; on the CPU everything is
float32.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

import moba

JSON_NAME = "train_recall.json"
PNG_NAME = "train_recall.png"
ATTNS = ("moba", "moba_naive", "sdpa")


@dataclass(frozen=True)
class Settings:
    """Everything that defines a run (stored in the JSON)."""

    device: str
    stages: tuple[tuple[int, int], ...]  # (sequence length, steps), in order
    tokens_per_step: int
    pairs: int
    repeats: int  # scattered places of each pair in its segment
    repeat_fraction: float  # 0, or the passage of each pair as a fraction of its segment
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    rope_theta: float
    filler_vocab: int
    key_vocab: int
    value_vocab: int
    block_size: int
    top_k: int
    full_attention_layers: tuple[int, ...]
    lr: float
    warmup: int
    weight_decay: float
    clip: float
    seed: int
    dtype: str
    time_budget_s: float

    @property
    def vocab(self) -> int:
        # filler ids, then key ids, then value ids, then the query marker.
        return self.filler_vocab + self.key_vocab + self.value_vocab + 1

    @property
    def marker(self) -> int:
        return self.vocab - 1

    @property
    def steps(self) -> int:
        return sum(steps for _, steps in self.stages)

    @property
    def seq_len(self) -> int:
        """The longest sequence of the curriculum."""
        return max(length for length, _ in self.stages)

    def stage_of(self, step: int) -> int:
        """Index of the stage that ``step`` belongs to."""
        end = 0
        for index, (_, steps) in enumerate(self.stages):
            end += steps
            if step < end:
                return index
        raise ValueError(f"step: expected < {self.steps}, got {step}")

    def batch_of(self, seq_len: int) -> int:
        return max(1, self.tokens_per_step // seq_len)

    def segment_of(self, seq_len: int) -> int:
        """Context positions per pair at length ``seq_len`` (its stretch of the context)."""
        return (seq_len - self.pairs) // self.pairs

    def places_of(self, seq_len: int) -> int:
        """Positions holding each pair at length ``seq_len``: ``repeats``, or with
        ``repeat_fraction`` that fraction of the segment (at least one)."""
        if self.repeat_fraction:
            return max(1, round(self.repeat_fraction * self.segment_of(seq_len)))
        return self.repeats

    def placement(self) -> str:
        """How the pairs are laid out, in words (for the run's printed summary)."""
        if self.repeat_fraction:
            places = ", ".join(str(self.places_of(n)) for n, _ in self.stages)
            lengths = ", ".join(str(n) for n, _ in self.stages)
            return (
                f"each over a passage of {self.repeat_fraction:g} of its segment: "
                f"{places} places at {lengths} tokens"
            )
        if self.repeats > 1:
            return f"each at {self.repeats} scattered places of its segment"
        return "each at one place of its segment"


# --------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """One batch of the recall task, all ``[batch, seq_len]`` but ``answers``.

    Each position holds a token (``ids``) and optionally a second one added to its
    input embedding (``extra``, where ``has_extra``): a pair is its key plus its
    value, a query is its key plus the query marker, filler has none.
    """

    ids: torch.Tensor
    extra: torch.Tensor
    has_extra: torch.Tensor
    answers: torch.Tensor  # [batch, pairs]: the value of each query, in order


def make_batch(settings: Settings, step: int) -> Batch:
    """Batch ``step`` of the recall task: a function of (seed, step) only, so both
    runs see the same data in the same order. Its length is the step's stage's.

    Layout of a sequence of length T: ``T - pairs`` context positions (filler, with
    the pairs at random offsets, each pair at ``places_of(T)`` places of its own one
    of ``pairs`` equal segments, so that the pairs are spread over the whole context),
    then ``pairs`` queries: every key once, in a new random order. The model answers
    each query at its position. The places are ``repeats`` distinct random ones
    (scattered), or with ``repeat_fraction`` one contiguous run (a passage) at a
    random offset of the segment.
    """
    s = settings
    seq_len = s.stages[s.stage_of(step)][0]
    batch = s.batch_of(seq_len)
    context = seq_len - s.pairs
    segment = s.segment_of(seq_len)
    places_per_pair = s.places_of(seq_len)
    generator = torch.Generator().manual_seed(s.seed * 1_000_003 + step)
    ids = torch.randint(0, s.filler_vocab, (batch, seq_len), generator=generator)
    extra = torch.zeros((batch, seq_len), dtype=torch.long)
    has_extra = torch.zeros((batch, seq_len), dtype=torch.bool)
    answers = torch.empty((batch, s.pairs), dtype=torch.long)
    key_base, value_base = s.filler_vocab, s.filler_vocab + s.key_vocab
    for row in range(batch):
        # Distinct keys (a key asked twice would have two right answers), any values.
        keys = key_base + torch.randperm(s.key_vocab, generator=generator)[: s.pairs]
        values = value_base + torch.randint(0, s.value_vocab, (s.pairs,), generator=generator)
        # [pairs, places_per_pair]: distinct places in each pair's segment, all
        # holding the pair. A passage is contiguous, as a fact discussed over a
        # stretch of text is: MoBA's blocks then see it together.
        if s.repeat_fraction:
            starts = torch.randint(
                0, segment - places_per_pair + 1, (s.pairs, 1), generator=generator
            )
            offsets = starts + torch.arange(places_per_pair)
        elif s.repeats == 1:
            offsets = torch.randint(0, segment, (s.pairs, 1), generator=generator)
        else:
            offsets = torch.stack(
                [torch.randperm(segment, generator=generator)[: s.repeats] for _ in range(s.pairs)]
            )
        places = (torch.arange(s.pairs) * segment).unsqueeze(1) + offsets
        ids[row, places] = keys.unsqueeze(1).expand_as(places)
        extra[row, places] = values.unsqueeze(1).expand_as(places)
        has_extra[row, places] = True
        order = torch.randperm(s.pairs, generator=generator)
        ids[row, context:] = keys[order]
        extra[row, context:] = s.marker
        has_extra[row, context:] = True
        answers[row] = values[order]
    return Batch(ids, extra, has_extra, answers)


def embed(model: LlamaForCausalLM, batch: Batch) -> torch.Tensor:
    """The input embeddings of a batch: token, plus the second token where there is one."""
    table = model.get_input_embeddings()
    tokens = table(batch.ids)
    return tokens + table(batch.extra) * batch.has_extra.unsqueeze(-1).to(tokens.dtype)


# --------------------------------------------------------------------------
# The models and their training
# --------------------------------------------------------------------------


def build_model(settings: Settings) -> LlamaForCausalLM:
    s = settings
    config = LlamaConfig(
        vocab_size=s.vocab,
        hidden_size=s.hidden,
        intermediate_size=4 * s.hidden,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        head_dim=s.head_dim,
        max_position_embeddings=s.seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": s.rope_theta},
        attention_dropout=0.0,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        # Tied: the answer's logit is then its embedding's dot product with the
        # output, so copying the value found is easy to learn.
        tie_word_embeddings=True,
    )
    torch.manual_seed(s.seed)
    return LlamaForCausalLM(config)


def lr_at(settings: Settings, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak over all stages."""
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return settings.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Run:
    """One model (attention ``attn``) with its float32 master weights and optimizer."""

    def __init__(self, settings: Settings, initial: dict[str, torch.Tensor], attn: str) -> None:
        s = settings
        self.settings = settings
        self.attn = attn
        self.device = torch.device(s.device)
        model = build_model(s)
        model.load_state_dict(initial)
        model.set_attn_implementation(attn)
        if attn in ("moba", "moba_naive"):
            moba.configure(
                model,
                block_size=s.block_size,
                top_k=s.top_k,
                full_attention_layers=s.full_attention_layers,
            )
        # nn.Module.to itself: transformers' wrapper of it confuses type checkers.
        torch.nn.Module.to(model, device=self.device, dtype=getattr(torch, s.dtype)).train()
        self.model = model
        # float32 master weights for AdamW; the model itself computes in s.dtype.
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.master = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        pairs = list(zip(self.master, self.params, strict=True))
        self.optimizer = torch.optim.AdamW(
            [
                {"params": [m for m, p in pairs if p.dim() >= 2], "weight_decay": s.weight_decay},
                {"params": [m for m, p in pairs if p.dim() < 2], "weight_decay": 0.0},
            ],
            lr=s.lr,
            betas=(0.9, 0.95),
        )
        self.loss: list[float] = []
        self.accuracy: list[float] = []
        self.step_ms: list[float] = []

    def step(self, batch: Batch, lr: float) -> None:
        s = self.settings
        ids, extra = batch.ids.to(self.device), batch.extra.to(self.device)
        has_extra, answers = batch.has_extra.to(self.device), batch.answers.to(self.device)
        on_device = Batch(ids, extra, has_extra, answers)
        synchronize(self.device)
        start = time.perf_counter()
        # The queries are the last `pairs` positions: only their logits are computed.
        out = self.model(
            inputs_embeds=embed(self.model, on_device), logits_to_keep=s.pairs, use_cache=False
        )
        logits = out.logits.float()
        loss = F.cross_entropy(logits.reshape(-1, s.vocab), answers.reshape(-1))
        loss.backward()
        for m, p in zip(self.master, self.params, strict=True):
            m.grad = p.grad.float() if p.grad is not None else None
            p.grad = None
        torch.nn.utils.clip_grad_norm_(self.master, s.clip)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for m, p in zip(self.master, self.params, strict=True):
                p.copy_(m)
        accuracy = (logits.argmax(-1) == answers).float().mean()
        self.loss.append(float(loss.detach()))  # also the synchronization point of the step
        self.accuracy.append(float(accuracy))
        synchronize(self.device)
        self.step_ms.append((time.perf_counter() - start) * 1e3)

    def summary(self) -> dict[str, Any]:
        s = self.settings
        done = len(self.loss)
        stages = []
        first = 0
        for length, steps in s.stages:
            last = min(first + steps, done)
            if last <= first:
                break
            # The mean of the stage's last steps: where its curve has settled.
            tail = max(1, min(20, (last - first) // 3))
            times = sorted(self.step_ms[first:last])
            stages.append(
                {
                    "seq_len": length,
                    "batch": s.batch_of(length),
                    "places_per_pair": s.places_of(length),
                    "steps_done": last - first,
                    "loss_mean_last": round(sum(self.loss[last - tail : last]) / tail, 5),
                    "accuracy_mean_last": round(sum(self.accuracy[last - tail : last]) / tail, 5),
                    "mean_of_last_steps": tail,
                    "median_step_ms": round(times[len(times) // 2], 2),
                }
            )
            first += steps
        run: dict[str, Any] = {
            "attn_implementation": self.attn,
            "loss": [round(x, 5) for x in self.loss],
            "accuracy": [round(x, 5) for x in self.accuracy],
            "step_ms": [round(x, 2) for x in self.step_ms],
            "stages": stages,
            "total_step_s": round(sum(self.step_ms) / 1e3, 2),
        }
        if self.attn in ("moba", "moba_naive"):
            run["moba_settings"] = moba.configure(self.model).to_dict()
        return run


def train(
    settings: Settings, initial: dict[str, torch.Tensor], attns: list[str], log_every: int
) -> tuple[list[Run], bool]:
    """All runs, step for step on the same batches; stops early (all runs at the same
    step) once ``time_budget_s`` is spent. Returns the runs and whether all steps ran."""
    s = settings
    device = torch.device(s.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = [Run(s, initial, attn) for attn in attns]
    started = time.perf_counter()
    previous = 0.0  # elapsed time at the end of the previous step
    for step in range(s.steps):
        stage = s.stage_of(step)
        stage_start = sum(steps for _, steps in s.stages[:stage])
        batch = make_batch(s, step)
        for run in runs:
            run.step(batch, lr_at(s, step))
        elapsed = time.perf_counter() - started
        # The first steps of each stage show its step time early (a slow setting
        # can be stopped at once); then every log_every steps.
        if log_every and (step - stage_start < 3 or step % log_every == 0 or step == s.steps - 1):
            parts = [
                f"{r.attn} loss {r.loss[-1]:.3f} acc {r.accuracy[-1]:.3f} {r.step_ms[-1]:7.1f} ms"
                for r in runs
            ]
            print(
                f"step {step:5d}  len {batch.ids.shape[1]:6d} x {batch.ids.shape[0]:4d}  "
                + "  |  ".join(parts)
                + f"  |  {elapsed:6.1f} s",
                flush=True,
            )
        if step - stage_start == 2 and log_every:
            # This stage's remaining steps at the wall time of its third step (the
            # first two include one-time costs: allocations, kernel selection).
            per_step = elapsed - previous
            left = per_step * (stage_start + s.stages[stage][1] - step - 1)
            note = ""
            if elapsed + left > s.time_budget_s:
                stop = step + int((s.time_budget_s - elapsed) / per_step) + 1
                note = f"; the time budget will stop it near step {stop}"
            elif stage == len(s.stages) - 1:
                note = f"; all stages done at about {elapsed + left:.0f} s"
            print(f"  this stage: about {left:.0f} s more{note}", flush=True)
        previous = elapsed
        if elapsed > s.time_budget_s and step < s.steps - 1:
            print(
                f"time budget of {s.time_budget_s:.0f} s spent after step {step}: stopping "
                "all runs here",
                flush=True,
            )
            return runs, False
    return runs, True


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


def git_commit() -> str:
    """MOBA_GIT_COMMIT where set (a copied tree, e.g. on a lent GPU machine whose own checkout
    is not what runs), else this checkout's HEAD."""
    if os.environ.get("MOBA_GIT_COMMIT"):
        return os.environ["MOBA_GIT_COMMIT"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def smooth(values: list[float], weight: float, restarts: tuple[int, ...] = ()) -> list[float]:
    """Exponential moving average, bias-corrected so the first points are not pulled to 0;
    it starts afresh at each index in ``restarts`` (a new stage's jump stays a jump)."""
    out, average, count = [], 0.0, 0
    for i, value in enumerate(values):
        if i in restarts:
            average, count = 0.0, 0
        average = weight * average + (1 - weight) * value
        count += 1
        out.append(average / (1 - weight**count))
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    """Loss and accuracy of every run against the step, raw (faint) and smoothed,
    with the curriculum's stages marked."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4.4), layout="constrained")
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    colors = {"moba": "#d62728", "moba_naive": "#ff7f0e", "sdpa": "#1f77b4"}
    steps = len(next(iter(result["runs"].values()))["loss"])
    weight = 0.8 if steps >= 50 else 0.0
    s = result["settings"]
    boundaries = [0]
    for _, stage_steps in s["stages"]:
        boundaries.append(boundaries[-1] + stage_steps)
    restarts = tuple(boundaries[:-1])
    for name, run in result["runs"].items():
        label = "MoBA" if name == "moba" else "full attention (sdpa)" if name == "sdpa" else name
        color = colors.get(name)
        x = range(len(run["loss"]))
        for axes, key in ((loss_axes, "loss"), (accuracy_axes, "accuracy")):
            if weight:
                axes.plot(x, run[key], color=color, alpha=0.25, linewidth=0.8)
            smoothed = smooth(run[key], weight, restarts)
            axes.plot(x, smoothed, color=color, label=label, linewidth=1.6)
    # What a model gets without recalling: a uniform guess among the values.
    loss_axes.axhline(math.log(s["value_vocab"]), color="gray", linestyle="--", linewidth=0.8)
    accuracy_axes.axhline(1 / s["value_vocab"], color="gray", linestyle="--", linewidth=0.8)
    for first, (length, _) in zip(boundaries, s["stages"], strict=False):
        if first >= steps:
            break
        for axes in (loss_axes, accuracy_axes):
            if first:
                axes.axvline(first, color="black", alpha=0.3, linewidth=0.8)
        label = f"{length // 1024}K" if length >= 1024 else str(length)
        accuracy_axes.text(first + 0.01 * steps, 1.03, label, fontsize=8, va="bottom")
    loss_axes.set(xlabel="step", ylabel="loss on the answers", title="Recall loss")
    accuracy_axes.set(xlabel="step", ylabel="answers right", ylim=(-0.02, 1.1))
    accuracy_axes.set_title("Recall accuracy (sequence length per stage)", pad=14)
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
        axes.legend()
    # JSONs written before --repeats / --repeat-fraction existed lack them.
    if s.get("repeat_fraction"):
        stated = f" (each over {s['repeat_fraction']:g} of its segment)"
    elif s.get("repeats", 1) > 1:
        stated = f" (each {s['repeats']} times)"
    else:
        stated = ""
    figure.suptitle(
        f"{s['layers']}-layer Llama, up to {s['stages'][-1][0]} tokens, {s['pairs']} pairs"
        f"{stated}; "
        f"MoBA block {s['block_size']}, top-k {s['top_k']}  ({result['device']})",
        fontsize=10,
    )
    figure.savefig(path, dpi=120)


def write_outputs(result: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / JSON_NAME
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {json_path}")
    try:
        plot(result, out_dir / PNG_NAME)
        print(f"wrote {out_dir / PNG_NAME}")
    except ImportError:
        print(
            "matplotlib is not installed: no plot. Make it elsewhere with "
            f"python3 examples/train_recall.py --plot-only {json_path}"
        )


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

# The three settings (docs/training.md): the CUDA run up to 16K tokens; the same
# task at 1K tokens for the CPU (the evidence that it is learnable); a CI smoke run.
PRESETS: dict[str, dict[str, Any]] = {
    "cuda": {
        "stages": "128:150,512:50,2048:50,8192:150,16384:1200",
        "tokens_per_step": 32768,
        "block_size": 1024,
        "top_k": 4,
        "time_budget_s": 300.0,
    },
    "reduced": {
        "stages": "128:100,256:50,512:50,1024:200",
        "tokens_per_step": 4096,
        "block_size": 128,
        "top_k": 3,
        "time_budget_s": 1e9,
    },
    "tiny": {
        "stages": "64:80,256:10",
        "tokens_per_step": 2048,
        "block_size": 64,
        "top_k": 2,
        "time_budget_s": 1e9,
    },
}


def parse_stages(text: str) -> tuple[tuple[int, int], ...]:
    stages = []
    for part in text.split(","):
        try:
            length, steps = (int(x) for x in part.split(":"))
        except ValueError:
            raise SystemExit(
                f"--stages: expected LENGTH:STEPS[,LENGTH:STEPS...], got {text!r}"
            ) from None
        stages.append((length, steps))
    return tuple(stages)


def settings_from(args: argparse.Namespace) -> Settings:
    preset = "tiny" if args.tiny else "reduced" if args.reduced else "cuda"
    values = dict(PRESETS[preset])
    for name in values:
        given = getattr(args, name)
        if given is not None:
            values[name] = given
    device = args.device
    s = Settings(
        device=device,
        stages=parse_stages(values.pop("stages")),
        pairs=args.pairs,
        repeats=args.repeats,
        # Left out: off (0). Given, it must be a fraction in (0, 0.5]: check() says so
        # for every value but 0, which it cannot tell from "left out".
        repeat_fraction=0.0 if args.repeat_fraction is None else args.repeat_fraction,
        layers=args.layers,
        hidden=args.hidden,
        heads=args.heads,
        kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        rope_theta=args.rope_theta,
        filler_vocab=args.filler_vocab,
        key_vocab=args.key_vocab,
        value_vocab=args.value_vocab,
        full_attention_layers=tuple(args.full_attention_layers),
        lr=args.lr,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        clip=args.clip,
        seed=args.seed,
        dtype="float32" if device == "cpu" else "bfloat16",
        **values,
    )
    if args.repeat_fraction is not None and args.repeat_fraction == 0:
        raise SystemExit(
            "--repeat-fraction: expected 0 < F <= 0.5, got 0 (leave it out for no passages)"
        )
    check(s)
    return s


def check(s: Settings) -> None:
    """Clear errors for settings the task or the kernels cannot take."""
    for name in ("pairs", "repeats", "layers", "block_size", "top_k", "warmup", "tokens_per_step"):
        if getattr(s, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(s, name)}")
    if s.pairs > s.key_vocab:
        raise SystemExit(f"--pairs: expected 1..--key-vocab ({s.key_vocab}), got {s.pairs}")
    # 0 is off; a passage longer than half the segment would leave little room to
    # place it (a segment that is all passage tells the model where to look).
    if not 0 <= s.repeat_fraction <= 0.5:
        raise SystemExit(f"--repeat-fraction: expected 0 < F <= 0.5, got {s.repeat_fraction}")
    if s.repeat_fraction and s.repeats > 1:
        raise SystemExit(
            f"--repeat-fraction and --repeats {s.repeats}: expected one of them (a passage "
            "of each pair, or scattered repeats), not both"
        )
    for length, steps in s.stages:
        if steps < 1:
            raise SystemExit(f"--stages: expected >= 1 step per stage, got {length}:{steps}")
        # Each pair's segment must hold its places; the queries follow. A passage
        # is at most half its segment, so it fits any segment of one or more positions.
        places = s.places_of(length)
        needed = (places + 1) * s.pairs
        if length < needed:
            rule = "2 * --pairs" if s.repeat_fraction else "(--repeats + 1) * --pairs"
            raise SystemExit(
                f"--stages: a {length}-token stage has no room for {s.pairs} pairs "
                f"({places} places each) and their queries; expected lengths >= "
                f"{rule} ({needed})"
            )
    if s.heads % s.kv_heads:
        raise SystemExit(f"--kv-heads: expected a divisor of --heads ({s.heads}), got {s.kv_heads}")
    if s.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available (use --device cpu)")
        if not moba.backend_available("cuda"):
            raise SystemExit(
                "--device cuda: this build of moba has no usable CUDA backend "
                "(moba.backend_available('cuda') is False)"
            )
        if s.head_dim not in (64, 128):
            raise SystemExit(f"--head-dim: the CUDA kernels take 64 or 128, got {s.head_dim}")
    elif s.device != "cpu":
        raise SystemExit(f"--device: expected cpu or cuda[:N], got {s.device!r}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, help="cpu or cuda[:N]")
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument(
        "--reduced", action="store_true", help="the 1K-token setting (CPU, minutes)"
    )
    preset.add_argument("--tiny", action="store_true", help="the CI smoke setting (CPU, seconds)")
    parser.add_argument("--out-dir", type=Path, default=Path("train_recall_out"))
    parser.add_argument(
        "--attn",
        default="moba,sdpa",
        help="comma list of attention implementations to train (moba, moba_naive, sdpa)",
    )
    parser.add_argument("--plot-only", type=Path, help="redraw the plot of a JSON and exit")
    group = parser.add_argument_group(
        "curriculum and budget (defaults: CUDA setting / --reduced / --tiny)"
    )
    group.add_argument(
        "--stages",
        help="LENGTH:STEPS,... sequence length of each stage and its steps "
        f"({PRESETS['cuda']['stages']} / {PRESETS['reduced']['stages']} / "
        f"{PRESETS['tiny']['stages']})",
    )
    group.add_argument(
        "--tokens-per-step",
        type=int,
        help="tokens per batch; batch = this // length (32768 / 4096 / 2048)",
    )
    group.add_argument(
        "--time-budget-s",
        type=float,
        help="stop all runs at the same step once this much time is spent (300 on CUDA)",
    )
    group = parser.add_argument_group("task and model")
    group.add_argument("--pairs", type=int, default=16, help="key-value pairs per sequence")
    group.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="places of each pair in its segment, scattered (a restated fact)",
    )
    group.add_argument(
        "--repeat-fraction",
        type=float,
        help="state each pair over a passage: a contiguous run of max(1, round(F * segment)) "
        "places at a random offset of its segment, so it grows with the stage's length "
        "(0 < F <= 0.5; not with --repeats > 1; default: off)",
    )
    group.add_argument("--key-vocab", type=int, default=64, help="distinct keys, >= --pairs")
    group.add_argument("--value-vocab", type=int, default=16, help="distinct values")
    group.add_argument("--filler-vocab", type=int, default=16, help="distinct filler tokens")
    group.add_argument("--layers", type=int, default=2, help="decoder layers")
    group.add_argument("--hidden", type=int, default=256, help="hidden size")
    group.add_argument("--heads", type=int, default=4, help="query heads")
    group.add_argument("--kv-heads", type=int, default=4, help="key/value heads")
    group.add_argument("--head-dim", type=int, default=64, help="64 or 128 on CUDA")
    group.add_argument(
        "--rope-theta",
        type=float,
        default=1e6,
        help="rotary base; large so that content matching survives 16K-token distances",
    )
    group = parser.add_argument_group("MoBA")
    group.add_argument("--block-size", type=int, help="keys per block (1024 / 128 / 64)")
    group.add_argument("--top-k", type=int, help="blocks per query, own block included (4 / 3 / 2)")
    group.add_argument(
        "--full-attention-layers",
        type=int,
        nargs="*",
        default=[],
        help="layers kept on full attention in the MoBA run (negative counts from the end)",
    )
    group = parser.add_argument_group("optimisation")
    group.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    group.add_argument("--warmup", type=int, default=20, help="warm-up steps")
    group.add_argument("--weight-decay", type=float, default=0.1)
    group.add_argument("--clip", type=float, default=1.0, help="gradient norm clip")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--log-every", type=int, default=25, help="print every N steps (0: never)")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.plot_only is not None:
        saved = json.loads(args.plot_only.read_text())
        plot(saved, args.plot_only.with_suffix(".png"))
        print(f"wrote {args.plot_only.with_suffix('.png')}")
        return
    settings = settings_from(args)
    attns = [a.strip() for a in args.attn.split(",") if a.strip()]
    for attn in attns:
        if attn not in ATTNS:
            raise SystemExit(f"--attn: expected moba, moba_naive or sdpa, got {attn!r}")
    # Registration only names the backends; each model's block size and top-k
    # are set with moba.configure in Run.
    moba.register()
    initial = copy.deepcopy(build_model(settings).state_dict())
    s = settings
    print(
        f"recall: {s.pairs} pairs ({s.placement()}), stages "
        f"{', '.join(f'{n}x{t}' for t, n in s.stages)} "
        f"(length x steps), {s.tokens_per_step} tokens per step, {s.layers} layers x "
        f"{s.hidden} ({s.heads} heads / {s.kv_heads} kv, head_dim {s.head_dim}), "
        f"{sum(t.numel() for t in initial.values()) / 1e6:.1f}M parameters, {s.dtype} on "
        f"{s.device}; MoBA block {s.block_size} top-k {s.top_k}",
        flush=True,
    )
    started = time.perf_counter()
    runs, complete = train(settings, initial, attns, args.log_every)
    result: dict[str, Any] = {
        "task": "key-value recall with a length curriculum (examples/train_recall.py)",
        "settings": asdict(settings) | {"vocab": settings.vocab},
        "device": device_name(settings.device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "moba": moba.__version__,
        "wall_s": round(time.perf_counter() - started, 1),
        "complete": complete,
        "chance_accuracy": round(1 / settings.value_vocab, 5),
        "runs": {run.attn: run.summary() for run in runs},
    }
    if settings.device.startswith("cuda"):
        # Of all runs together: they train side by side on one device.
        device = torch.device(settings.device)
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    for name, run in result["runs"].items():
        print(f"{name} (accuracy at the end of each stage, median step ms):")
        for stage in run["stages"]:
            print(
                f"  len {stage['seq_len']:6d} ({stage['places_per_pair']} places per pair): "
                f"acc {stage['accuracy_mean_last']:.3f}  "
                f"loss {stage['loss_mean_last']:.3f}  {stage['median_step_ms']:8.1f} ms"
            )
    write_outputs(result, args.out_dir)


if __name__ == "__main__":
    main()
