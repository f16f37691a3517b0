"""Vocabularies: ``tokenizer_source: union``, added-token fine-tunes in ``merge`` and ``ema``, ``align_rows``.

The inputs are tiny Llamas with real tokenizers saved beside them: a base (the toy BPE tokenizer) and two
fine-tunes made the common way (``add_tokens`` + ``resize_token_embeddings``), which add different tokens and
share one (``<think>``) at different ids. Every expectation is computed independently in float64 by token
string from the files on disk, and the union is also compared with mergekit's own ``tokenizer_source: union``.

Before this change a fine-tune's added rows were cut (task arithmetic and every method whose config comes from
the base) with a warning that named no token, or matched by position (``lerp``, ``ema``); tokens added at
different ids by two fine-tunes were mixed up.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from mergekit_safe.cli import main
from mergekit_safe.merge.engine import merge, plan_merge
from mergekit_safe.merge.recipe import ModelSpec, Recipe
from mergekit_safe.merge.vocab import align_rows, missing_tokens
from mergekit_safe.tiny import toy_llama, toy_tokenizer
from tests.helpers import assert_close

CORPUS = ["I cannot help with that.", "Sure, here is how you do it.", "The cat sat on the mat."] * 3
VOCAB = ("model.embed_tokens.weight", "lm_head.weight")
FT1_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
ADDED = {"ft1": (["<tool>", "<think>"], ["<|im_x|>"]), "ft2": (["<think>", "zebra"], [])}
# fp32 inputs and fp32 merge math, rounded once, against float64: a few ulp of values up to ~4 (lm_head std 1)
F32 = (2e-6, 1e-6)


def tokenizer(added: tuple[list[str], list[str]] = ([], []), template: str | None = None, size: int = 300) -> Any:
    tok = toy_tokenizer(CORPUS, vocab_size=size)  # deterministic: the same base vocabulary every time
    tok.add_tokens(added[0])
    tok.add_tokens(added[1], special_tokens=True)
    if template is not None:
        tok.chat_template = template
    return tok


def save(folder: Path, tok: Any, seed: int, noise: float = 0.05) -> Path:
    """The base model (seed 0) resized to ``tok`` and moved by seeded noise, saved with its tokenizer."""
    base_tok = tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = toy_llama(base_tok, seed=0)
        if len(tok) != len(base_tok):
            model.resize_token_embeddings(len(tok), mean_resizing=False)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * noise)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base (300 tokens), ft1 (+ <tool>, <think>, special <|im_x|>, own chat template), ft2 (+ <think>, zebra),
    small (a 290-token BPE of the same corpus, a prefix of the base's, + <tool> at id 290: it lacks 10 of the
    base's tokens, which take the base's rows)."""
    d = tmp_path_factory.mktemp("vocab")
    return {
        "base": save(d / "base", tokenizer(), seed=0, noise=0.0),
        "ft1": save(d / "ft1", tokenizer(ADDED["ft1"], FT1_TEMPLATE), seed=1),
        "ft2": save(d / "ft2", tokenizer(ADDED["ft2"]), seed=2),
        "small": save(d / "small", tokenizer((["<tool>"], []), size=290), seed=3),
    }


def cli(*args: str | Path) -> Any:
    return CliRunner().invoke(main, [str(a) for a in args])


def vocab_of(folder: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return dict(AutoTokenizer.from_pretrained(folder).get_vocab())


def aligned_inputs(folders: list[Path], out_vocab: dict[str, int], name: str) -> list[torch.Tensor]:
    """Every input's rows of ``name`` in the output vocabulary, by token string, float64 (base = folders[0]):
    an input's own row, else the base's row, else the mean of the rows of the inputs that have the token."""
    vocabs = [vocab_of(f) for f in folders]
    weights = [load_file(f / "model.safetensors")[name].double() for f in folders]
    rows = max(out_vocab.values()) + 1
    out = [torch.empty(rows, weights[0].shape[1], dtype=torch.float64) for _ in folders]
    for token, i in out_vocab.items():
        have = [k for k, v in enumerate(vocabs) if token in v and v[token] < weights[k].shape[0]]
        if 0 in have:
            fill = weights[0][vocabs[0][token]]
        else:
            fill = sum(weights[k][vocabs[k][token]] for k in have) / len(have)
        for k in range(len(folders)):
            out[k][i] = weights[k][vocabs[k][token]] if k in have else fill
    return out


def combine(method: str, xs: list[torch.Tensor], w: list[float]) -> torch.Tensor:
    """The float64 formula: linear normalizes its weights (mergekit's default); task arithmetic is
    ``base + sum w_k (x_k - base)``; ema's ``xs`` are checkpoints in order, ``w`` holds beta."""
    if method == "linear":
        return sum(wk * x for wk, x in zip(w, xs)) / sum(w)
    if method == "task_arithmetic":
        return xs[0] + sum(wk * (x - xs[0]) for wk, x in zip(w, xs[1:]))
    e = xs[0]
    for x in xs[1:]:
        e = w[0] * e + (1 - w[0]) * x
    return e


def recipe_yaml(path: Path, method: str, family: dict[str, Path], fts: tuple[str, ...] = ("ft1", "ft2"),
                **extra: str) -> Path:
    base = {"base_model": str(family["base"])} if method == "task_arithmetic" else {}
    weights = dict(zip(fts, (0.6, 0.4)), base=0.2)
    models = [{"model": str(family[k]), "parameters": {"weight": weights[k]}}
              for k in (("base",) if method == "linear" else ()) + fts]
    path.write_text(json.dumps({"merge_method": method, **base, "models": models, **extra}))
    return path


@pytest.mark.parametrize("method, weights", [("task_arithmetic", [0.6, 0.4]), ("linear", [0.2, 0.6, 0.4])])
@pytest.mark.parametrize("fts", [("ft1", "ft2"), ("small", "ft1")])
def test_union_matches_the_float64_reference_by_token_string(family: dict[str, Path], tmp_path: Path,
                                                              method: str, weights: list[float],
                                                              fts: tuple[str, str]) -> None:
    out = tmp_path / "out"
    cfg = recipe_yaml(tmp_path / "r.yml", method, family, fts, tokenizer_source="union")
    result = cli("merge", "--config", cfg, "-o", out, "--no-progress")
    assert result.exit_code == 0, result.output
    folders = [family["base"], *(family[k] for k in fts)]
    union = vocab_of(out)
    base_vocab = vocab_of(family["base"])
    # base ids first, unchanged; then each input's new tokens in input order, each in id order
    assert {t: union[t] for t in base_vocab} == base_vocab
    want = list(dict.fromkeys(t for f in folders[1:] for t, _ in sorted(vocab_of(f).items(), key=lambda x: x[1])
                              if t not in base_vocab))
    assert sorted((i, t) for t, i in union.items() if t not in base_vocab) == list(enumerate(want, start=300))
    if fts == ("ft1", "ft2"):
        assert want == ["<tool>", "<think>", "<|im_x|>", "zebra"]
    else:  # the small BPE adds nothing new (its vocabulary is a prefix of the base's): only ft1's tokens
        assert want == ["<tool>", "<think>", "<|im_x|>"]
    merged = load_file(out / "model.safetensors")
    for name in VOCAB:
        assert_close(merged[name], combine(method, aligned_inputs(folders, union, name), weights), *F32, name)
    states = [load_file(f / "model.safetensors") for f in folders]
    for name in set(merged) - set(VOCAB):
        assert_close(merged[name], combine(method, [s[name].double() for s in states], weights), *F32, name)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(union) == 300 + len(want)


def test_union_agrees_with_mergekit(family: dict[str, Path], tmp_path: Path) -> None:
    """mergekit 0.1.5's own ``tokenizer_source: union`` on the same inputs: the same tokens, the same special
    flags and the same row for every token. Both compute in fp32 (summation order differs: a few ulp).

    One difference, by design: the ids of the new tokens. mergekit appends the inputs' new tokens in the
    iteration order of a ``set`` of models (``MergeConfiguration.referenced_models``), which follows string
    hashes and so may change between runs; we append them in the recipe's input order, the same every run.
    Rows are therefore compared by token string.
    """
    pytest.importorskip("mergekit.merge")
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from transformers import AutoTokenizer

    cfg = recipe_yaml(tmp_path / "r.yml", "task_arithmetic", family, tokenizer_source="union")
    theirs, ours = tmp_path / "mergekit", tmp_path / "ours"
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(cfg.read_text())), str(theirs),
              options=MergeOptions(quiet=True))
    assert cli("merge", "--config", cfg, "-o", ours, "--no-progress").exit_code == 0
    t_ours, t_theirs = AutoTokenizer.from_pretrained(ours), AutoTokenizer.from_pretrained(theirs)
    v_ours, v_theirs = t_ours.get_vocab(), t_theirs.get_vocab()
    assert v_ours.keys() == v_theirs.keys()
    assert {t: v_theirs[t] for t in vocab_of(family["base"])} == vocab_of(family["base"])  # base ids kept by both
    flags = lambda t: {a.content: a.special for a in t.added_tokens_decoder.values()}
    assert flags(t_ours) == flags(t_theirs)
    assert t_ours.chat_template == t_theirs.chat_template
    a, b = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert a.keys() == b.keys()
    order = sorted(v_ours, key=v_ours.__getitem__)
    theirs_by_token = torch.tensor([v_theirs[t] for t in order])
    for name in a:
        b_name = b[name][theirs_by_token] if name in VOCAB else b[name]
        assert_close(a[name], b_name, 1e-6, 1e-6, name)


def test_union_output_loads_and_added_tokens_round_trip(family: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    result = cli("merge", "--method", "task_arithmetic", family["base"], family["ft1"], family["ft2"],
                 "--tokenizer-source", "union", "-o", out, "--no-progress")
    assert result.exit_code == 0, result.output
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert model.config.vocab_size == len(tok) == 304
    for token in ("<tool>", "<think>", "<|im_x|>", "zebra"):
        ids = tok.encode(token, add_special_tokens=False)
        assert ids == [tok.convert_tokens_to_ids(token)] and tok.decode(ids) == token
    specials = {a.content: a.special for a in tok.added_tokens_decoder.values()}
    assert specials["<|im_x|>"] and not specials["<tool>"] and not specials["zebra"]
    ids = torch.tensor([tok.encode("<tool> the cat <think>zebra<|im_x|>", add_special_tokens=False)])
    with torch.no_grad():
        assert model(ids).logits.shape == (1, ids.shape[1], 304)
    assert tok.chat_template == tokenizer().chat_template  # the base's by default


def test_chat_template_is_chosen_explicitly(family: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    for choice, want in (("base", tokenizer().chat_template), (str(family["ft1"]), FT1_TEMPLATE)):
        out = tmp_path / f"out-{len(want)}"
        cfg = recipe_yaml(tmp_path / "r.yml", "task_arithmetic", family, tokenizer_source="union",
                          chat_template=choice)
        assert cli("merge", "--config", cfg, "-o", out, "--no-progress").exit_code == 0
        assert AutoTokenizer.from_pretrained(out).chat_template == want
    # without union: the tokenizer source's vocabulary with another input's template
    out = tmp_path / "base-with-ft1-template"
    result = cli("merge", "--method", "task_arithmetic", family["base"], family["ft1"], "--chat-template",
                 str(family["ft1"]) + "/", "-o", out, "--no-progress")
    assert result.exit_code == 0, result.output
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == FT1_TEMPLATE and tok.get_vocab() == vocab_of(family["base"])


def test_default_keeps_the_base_vocabulary_and_names_the_dropped_tokens(family: dict[str, Path],
                                                                        tmp_path: Path) -> None:
    """Like mergekit without ``tokenizer_source``: the base's tokenizer; the fine-tunes' added rows are dropped,
    and one warning per fine-tune names its tokens and the fix."""
    out = tmp_path / "out"
    result = cli("merge", "--config", recipe_yaml(tmp_path / "r.yml", "task_arithmetic", family), "-o", out,
                 "--no-progress")
    assert result.exit_code == 0, result.output
    fix = "set tokenizer_source: union (--tokenizer-source union) to keep them"
    assert (f"warning: {family['ft1']}: its tokens '<tool>', '<think>', '<|im_x|>' are not in the output "
            f"vocabulary (from {family['base']}), so their embedding rows are dropped; {fix}") in result.output
    assert f"warning: {family['ft2']}: its tokens '<think>', 'zebra' are not in the output" in result.output
    base_vocab = vocab_of(family["base"])
    assert vocab_of(out) == base_vocab
    merged = load_file(out / "model.safetensors")
    folders = [family["base"], family["ft1"], family["ft2"]]
    for name in VOCAB:
        assert_close(merged[name], combine("task_arithmetic", aligned_inputs(folders, base_vocab, name), [0.6, 0.4]),
                     *F32, name)


def test_lerp_keeps_the_finetunes_added_tokens(family: dict[str, Path], tmp_path: Path) -> None:
    """lerp takes the fine-tune's config and tokenizer: its new tokens keep its rows (the base lacks them)."""
    out = tmp_path / "out"
    result = cli("merge", "--method", "lerp", "--alpha", "0.3", family["base"], family["ft1"], "-o", out,
                 "--no-progress")
    assert result.exit_code == 0, result.output
    assert "its tokens" not in result.output  # nothing dropped
    ft_vocab = vocab_of(family["ft1"])
    assert vocab_of(out) == ft_vocab
    merged = load_file(out / "model.safetensors")
    for name in VOCAB:
        base, ft = aligned_inputs([family["base"], family["ft1"]], ft_vocab, name)
        assert_close(merged[name], 0.7 * base + 0.3 * ft, *F32, name)
        assert torch.equal(merged[name][300:], load_file(family["ft1"] / "model.safetensors")[name][300:])


@pytest.mark.parametrize("source", [None, "union"])
def test_ema_over_checkpoints_that_grew(tmp_path: Path, source: str | None) -> None:
    """A run that added tokens at step 200: c_100 has 300 rows, c_200 and c_300 have 303."""
    run = tmp_path / "run"
    grown = ADDED["ft1"]
    cks = [save(run / "checkpoint-100", tokenizer(), seed=5),
           save(run / "checkpoint-200", tokenizer(grown), seed=6),
           save(run / "checkpoint-300", tokenizer(grown), seed=7)]
    out = tmp_path / "ema"
    extra = ["--tokenizer-source", source] if source else []
    result = cli("ema", *reversed(cks), "--beta", "0.8", *extra, "-o", out, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "its tokens" not in result.output
    grown_vocab = vocab_of(cks[-1])
    assert vocab_of(out) == grown_vocab
    merged = load_file(out / "model.safetensors")
    for name in VOCAB:  # c_100 lacks the new tokens, and it is the base: the mean of c_200 and c_300 fills them
        assert_close(merged[name], combine("ema", aligned_inputs(cks, grown_vocab, name), [0.8]), *F32, name)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_chunk_boundaries_inside_rows_change_nothing(family: dict[str, Path], tmp_path: Path, method: str) -> None:
    """Rows are gathered per chunk: a chunk of 7 elements (rows are 32 wide) gives the same bytes."""
    density = {"density": 0.5} if method == "ties" else {}
    recipe = Recipe(method, [ModelSpec(str(family["ft1"]), {"weight": 0.6, **density}),
                             ModelSpec(str(family["ft2"]), {"weight": 0.4, **density})],
                    base_model=str(family["base"]), tokenizer_source="union")
    small = merge(recipe, tmp_path / "small", chunk_elems=7, progress=False, hash_inputs=False)
    whole = merge(recipe, tmp_path / "whole", progress=False, hash_inputs=False)
    assert small.warnings == whole.warnings
    a, b = load_file(tmp_path / "small" / "model.safetensors"), load_file(tmp_path / "whole" / "model.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_union_on_cuda_matches_cpu(family: dict[str, Path], tmp_path: Path, method: str) -> None:
    """Gathered rows go through the pinned ring (linear) and the streamed passes (ties) on the GPU too."""
    density = {"density": 0.5} if method == "ties" else {}
    recipe = Recipe(method, [ModelSpec(str(family["ft1"]), {"weight": 0.6, **density}),
                             ModelSpec(str(family["ft2"]), {"weight": 0.4, **density})],
                    base_model=str(family["base"]), tokenizer_source="union")
    merge(recipe, tmp_path / "cpu", progress=False, hash_inputs=False)
    merge(recipe, tmp_path / "gpu", progress=False, hash_inputs=False, device="cuda", chunk_elems=100)
    cpu, gpu = load_file(tmp_path / "cpu" / "model.safetensors"), load_file(tmp_path / "gpu" / "model.safetensors")
    for name in cpu:  # same fp32 math on both devices; FMA contraction on the GPU can change the last bit
        assert_close(gpu[name], cpu[name], 1e-6, 1e-6, name)


def test_one_tokenizer_needs_no_vocabulary_plan(family: dict[str, Path]) -> None:
    recipe = Recipe("lerp", [ModelSpec(str(family["base"]))], base_model=str(family["base"]) + "/.",
                    parameters={"alpha": 0.5})
    plan = plan_merge(recipe)
    try:
        assert plan.vocab is None  # same tokenizer files, same shapes: rows merge by position, nothing loaded
    finally:
        for c in plan.inputs:
            c.close()


def test_union_over_an_input_without_tokenizer_is_one_line(family: dict[str, Path], tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(family["ft1"] / name, bare / name)
    result = cli("merge", "--method", "task_arithmetic", family["base"], bare, "--tokenizer-source", "union",
                 "-o", tmp_path / "out", "--no-progress")
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"Error: {bare}: tokenizer_source union reads every input's tokenizer, and this one has none (none of "
        "tokenizer.json, tokenizer.model, tokenizer_config.json, vocab.json, vocab.txt, spiece.model, "
        "sentencepiece.bpe.model)")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--tokenizer-source", "nope", "tokenizer_source 'nope' must be 'base', 'union' or one of the input paths"),
    ("--chat-template", "union", "chat_template 'union' must be 'base' or one of the input paths"),
])
def test_bad_vocabulary_options_are_one_line(family: dict[str, Path], tmp_path: Path, flag: str, value: str,
                                             message: str) -> None:
    result = cli("merge", "--method", "task_arithmetic", family["base"], family["ft1"], flag, value,
                 "-o", tmp_path / "out", "--no-progress")
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: command line: {message}"


def test_chat_template_from_an_input_without_one_is_one_line(family: dict[str, Path], tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    shutil.copytree(family["ft2"], plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    result = cli("merge", "--method", "task_arithmetic", family["base"], plain, "--chat-template", plain,
                 "-o", tmp_path / "out", "--no-progress")
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: chat_template {str(plain)!r}: {plain} has no chat template in its tokenizer"


def test_align_rows_matches_a_loop_by_token_string(family: dict[str, Path]) -> None:
    name = "model.embed_tokens.weight"
    ft, base = load_file(family["ft2"] / "model.safetensors")[name], load_file(family["base"] / "model.safetensors")[name]
    ft_vocab, base_vocab = vocab_of(family["ft2"]), vocab_of(family["base"])
    got = align_rows(ft, ft_vocab, base_vocab, base)
    want = base.clone()
    for token, i in base_vocab.items():
        if token in ft_vocab:
            want[i] = ft[ft_vocab[token]]
    assert torch.equal(got, want)
    assert missing_tokens(ft_vocab, base_vocab) == ["<think>", "zebra"]
    # a permuted fine-tune vocabulary: rows follow their tokens, not their ids
    perm = torch.randperm(ft.shape[0])
    shuffled = {t: int(torch.nonzero(perm == i)) for t, i in ft_vocab.items()}
    assert torch.equal(align_rows(ft[perm], shuffled, base_vocab, base), want)


def test_without_tokenizers_dropped_rows_are_counted(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    """No tokenizer files: rows match by position, and rows the output has no room for are named by number."""
    from transformers import AutoModelForCausalLM

    aligned, _ = tiny_pair
    ft = AutoModelForCausalLM.from_pretrained(aligned)
    ft.resize_token_embeddings(136, mean_resizing=False)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.01)
    ft.save_pretrained(tmp_path / "ft")
    out = tmp_path / "out"
    result = cli("merge", "--method", "task_arithmetic", aligned, tmp_path / "ft", "-o", out, "--no-progress")
    assert result.exit_code == 0, result.output
    assert (f"warning: {tmp_path / 'ft'}: lm_head.weight has 136 rows, the output 128 (vocabulary from {aligned}; "
            "rows 128..135 are dropped, and no tokenizer names their tokens); give every input its tokenizer and "
            "set tokenizer_source: union (--tokenizer-source union) to keep them") in result.output
    merged = load_file(out / "model.safetensors")
    f = load_file(tmp_path / "ft" / "model.safetensors")
    for name in VOCAB:
        assert_close(merged[name], f[name][:128].double(), *F32, name)  # base + 1.0 * (ft - base)
