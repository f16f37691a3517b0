"""Vocabularies of merged models: which token each embedding row holds, and rows gathered by token string.

A fine-tune that added tokens (``tokenizer.add_tokens`` + ``resize_token_embeddings``) has more embedding and
``lm_head`` rows than its base, and two fine-tunes may give different ids to the same new token. The engine asks
this module, per embedding tensor and per chunk, for every input's rows laid out in the *output* vocabulary:

* the output vocabulary is the reference input's (``tokenizer_source: base`` or a path; unset: the input the
  method takes its config from), or with ``tokenizer_source: union`` the union of all inputs' vocabularies:
  the base's ids first, in order, then every other input's new tokens in input order (ids ascending);
* input ``k``'s row for output token ``t`` is its own row for ``t`` (looked up by token *string*); an input
  without a tokenizer is read by position (row ``i`` is token ``i``), the only assumption possible;
* an input that lacks ``t`` contributes the base's row for it, and when the base lacks it too, the mean of the
  rows of the inputs that have it (mergekit's rule: a token only one input has keeps that input's row).

Only one chunk of rows per input is held at a time, so memory stays bounded by the engine's chunk size.
:func:`align_rows` is the same mapping for a whole tensor in memory (the repair aligns a fine-tune's rows to
its base's vocabulary with it).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergekit_safe.errors import CheckpointError, RecipeError
from mergekit_safe.io.source import TensorSource
from mergekit_safe.merge.recipe import Recipe, module_type

__all__ = ["TOKENIZER_FILES", "RowMap", "VocabPlan", "align_rows", "gather_rows", "is_vocab_tensor",
           "missing_tokens", "plan_vocabulary", "write_tokenizer"]

# Files that make a folder's tokenizer (any one is enough for AutoTokenizer); also removed from an output folder
# before a rebuilt tokenizer is saved there, so no stale file of the reference's survives next to it.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")
_TOKENIZER_SIDE_FILES = (*TOKENIZER_FILES, "special_tokens_map.json", "added_tokens.json", "merges.txt",
                         "chat_template.jinja", "chat_template.json")
_SHOWN = 5  # token names listed in one warning; the rest are counted


def is_vocab_tensor(name: str, shape: Sequence[int]) -> bool:
    """Whether tensor ``name`` has one row per token (input embeddings, ``lm_head``), not positions."""
    lowered = name.lower()
    return (module_type(name) in ("embed", "head") and len(shape) == 2
            and "position" not in lowered and "wpe" not in lowered)


def _tokenizer_key(root: Path | None) -> bytes | None:
    """A digest of a folder's tokenizer files (None: it has none), so identical tokenizers load once."""
    if root is None:
        return None
    h, found = hashlib.sha256(), False
    for name in _TOKENIZER_SIDE_FILES:
        f = root / name
        if f.is_file():
            found = found or name in TOKENIZER_FILES
            h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.digest() if found else None


def _tokenizer_folder(source: TensorSource) -> Path | None:
    """Where an input's tokenizer lives: its own folder when that has tokenizer files (a LoRA adapter saved with
    the tokens it added), else the folder of its config (an adapter's base)."""
    own = Path(source.path)
    if own.is_dir() and any((own / f).is_file() for f in TOKENIZER_FILES):
        return own
    return source.root


def _load_tokenizer(root: Path) -> Any:
    """``AutoTokenizer`` of an input folder (never remote code); any failure is one line naming the folder."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(root), trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a broken tokenizer; the user needs one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{root}: cannot load the tokenizer ({first})") from None


@dataclass
class RowMap:
    """Where each output row of one vocabulary tensor comes from, per input.

    Attributes:
        rows: output row count.
        src: per input, an int64 tensor ``[rows]`` of its row for each output row (-1: it has none), or None
            for the identity (row ``i`` is row ``i``; every input row below ``rows`` exists).
        base: index of the input whose row fills another input's missing row.
    """

    rows: int
    src: list[torch.Tensor | None]
    base: int


@dataclass
class VocabPlan:
    """The output vocabulary and how every input's vocabulary maps onto it.

    Attributes:
        tokens: output token string -> id, or None when the reference has no tokenizer (rows by position).
        vocabs: per input, token string -> id (None: no tokenizer).
        paths: per input, its path (for messages).
        base: index of the base input (the recipe's base model, else the first input).
        reference: index of the input the output vocabulary comes from (the base for a union).
        union: whether the output vocabulary is the union of the inputs'.
        tokenizer: the output tokenizer to save (a union, or a chosen chat template), or None to copy the
            reference's tokenizer files unchanged.
        warnings: what a user should know (tokens dropped, rows filled).
    """

    tokens: dict[str, int] | None
    vocabs: list[dict[str, int] | None]
    paths: list[Path]
    base: int
    reference: int
    union: bool
    tokenizer: Any = None
    warnings: list[str] = field(default_factory=list)
    _maps: dict[tuple[str, tuple[int, ...]], RowMap] = field(default_factory=dict, repr=False)

    def out_rows(self, in_rows: Sequence[int]) -> int:
        """Output rows of a vocabulary tensor whose inputs have ``in_rows`` rows."""
        if not self.union or self.tokens is None:
            return in_rows[self.reference]
        return max(in_rows[self.base], max(self.tokens.values(), default=-1) + 1)

    def row_map(self, name: str, in_rows: Sequence[int]) -> RowMap:
        """The :class:`RowMap` of vocabulary tensor ``name`` (cached; the head and embeddings share one)."""
        key = (name, tuple(in_rows))
        if key not in self._maps:
            cached = next((m for (_, r), m in self._maps.items() if r == key[1]), None)
            self._maps[key] = cached or self._build_map(in_rows)
            if cached is None:
                self.warnings += self._row_warnings(name, in_rows, self._maps[key])
        return self._maps[key]

    def _build_map(self, in_rows: Sequence[int]) -> RowMap:
        rows = self.out_rows(in_rows)
        by_id = _inverse(self.tokens, rows)
        src: list[torch.Tensor | None] = []
        done: dict[tuple[int, int], torch.Tensor] = {}  # checkpoints of one run share a vocabulary dict
        for vocab, have in zip(self.vocabs, in_rows):
            if (vocab is None or vocab is self.tokens or self.tokens is None or vocab == self.tokens) and have >= rows:
                src.append(None)
                continue
            if (id(vocab), have) not in done:
                ids = [(vocab.get(t, -1) if (t is not None and vocab is not None) else i) for i, t in enumerate(by_id)]
                col = torch.tensor(ids, dtype=torch.int64)
                done[(id(vocab), have)] = torch.where(col < have, col, -1)
            src.append(done[(id(vocab), have)])
        return RowMap(rows, src, self.base)

    def _row_warnings(self, name: str, in_rows: Sequence[int], rmap: RowMap) -> list[str]:
        """One line per input whose rows are dropped (naming the tokens) or filled."""
        out = []
        ref = self.paths[self.reference]
        for k, (path, have) in enumerate(zip(self.paths, in_rows)):
            vocab = self.vocabs[k]
            lost = missing_tokens(vocab, self.tokens, have) if vocab is not None and self.tokens is not None else []
            if lost:
                out.append(f"{path}: its tokens {_names(lost)} are not in the output vocabulary (from {ref}), so "
                           "their embedding rows are dropped; set tokenizer_source: union (--tokenizer-source union) "
                           "to keep them")
            elif have > rmap.rows and (vocab is None or self.tokens is None or len(vocab) < have):
                why = "no tokenizer names their tokens" if vocab is None or self.tokens is None else \
                    "its tokenizer names no token for them"
                out.append(f"{path}: {name} has {have} rows, the output {rmap.rows} (vocabulary from {ref}; rows "
                           f"{rmap.rows}..{have - 1} are dropped, and {why}); give every input its tokenizer and "
                           "set tokenizer_source: union (--tokenizer-source union) to keep them")
            src = rmap.src[k]
            filled = int((src < 0).sum()) if src is not None else 0
            if filled and have != rmap.rows:
                out.append(f"{path}: {name} has {have} rows, the output {rmap.rows} (vocabulary from "
                           f"{'the union' if self.union else ref}; its {filled} missing rows are filled from the base "
                           "or the mean of the inputs that have the token)")
        return out


def _names(tokens: Sequence[str]) -> str:
    shown = ", ".join(repr(t) for t in tokens[:_SHOWN])
    return shown + (f" and {len(tokens) - _SHOWN} more" if len(tokens) > _SHOWN else "")


def _inverse(tokens: Mapping[str, int] | None, rows: int) -> list[str | None]:
    """Token string of each id below ``rows`` (None: no token has that id, e.g. a padding row)."""
    by_id: list[str | None] = [None] * rows
    for t, i in (tokens or {}).items():
        if 0 <= i < rows:
            by_id[i] = t
    return by_id


def missing_tokens(vocab: Mapping[str, int], target: Mapping[str, int], rows: int | None = None) -> list[str]:
    """Tokens of ``vocab`` (with an embedding row, id below ``rows``) that ``target`` lacks, by id.

    Example:
        >>> missing_tokens({"a": 0, "<tool>": 2, "b": 1}, {"a": 0, "b": 1})
        ['<tool>']
    """
    return [t for t, i in sorted(vocab.items(), key=lambda kv: kv[1])
            if t not in target and (rows is None or i < rows)]


def plan_vocabulary(recipe: Recipe, inputs: Sequence[TensorSource], reference: int,
                    vocab_rows: Mapping[str, Sequence[int]]) -> VocabPlan | None:
    """Decide the output vocabulary of a merge and how every input's rows map onto it.

    Args:
        recipe: the merge recipe (``tokenizer_source``, ``chat_template``).
        inputs: the opened inputs, the base first when the recipe has one.
        reference: index of the input the config and tokenizer come from.
        vocab_rows: per vocabulary tensor name, every input's row count.

    Returns:
        None when nothing needs mapping (one tokenizer, equal shapes, no template change): rows merge by
        position. Otherwise a :class:`VocabPlan`.

    Raises:
        CheckpointError: a union over an input without a tokenizer, or a tokenizer that cannot be loaded.
        RecipeError: ``chat_template`` names an input whose tokenizer has no chat template.
    """
    union = recipe.tokenizer_source == "union"
    roots = [_tokenizer_folder(c) for c in inputs]
    keys = [_tokenizer_key(r) for r in roots]
    shapes_differ = any(len(set(rows)) > 1 for rows in vocab_rows.values())
    if not (union or recipe.chat_template or shapes_differ or len(set(keys)) > 1):
        return None
    if union:
        for c, k in zip(inputs, keys):
            if k is None:
                raise CheckpointError(f"{c.path}: tokenizer_source union reads every input's tokenizer, and this "
                                      f"one has none (none of {', '.join(TOKENIZER_FILES)})")
    loaded: dict[bytes, tuple[Any, dict[str, int]]] = {}
    for key, root in zip(keys, roots):
        if key is not None and root is not None and key not in loaded:
            tok = _load_tokenizer(root)
            loaded[key] = (tok, dict(tok.get_vocab()))
    # inputs with identical tokenizer files share one tokenizer and one dict (an EMA over many checkpoints)
    toks = [loaded[k][0] if k is not None else None for k in keys]
    vocabs = [loaded[k][1] if k is not None else None for k in keys]
    base = 0
    embed_rows = next(iter(vocab_rows.values()), [0] * len(inputs))
    out_tok = _union_tokenizer(toks, roots[base], base, embed_rows) if union else None
    template = _chosen_template(recipe, inputs, toks)
    if template is not None:
        if out_tok is None:
            if toks[reference] is None:
                raise CheckpointError(f"{inputs[reference].path}: chat_template needs the output tokenizer, and "
                                      f"this input (the tokenizer source) has none")
            out_tok = _load_tokenizer(roots[reference])  # a fresh copy: the template is set on it
        out_tok.chat_template = template
    tokens = dict(out_tok.get_vocab()) if union else vocabs[reference]
    return VocabPlan(tokens, vocabs, [Path(c.path) for c in inputs], base, base if union else reference, union,
                     out_tok)


def _union_tokenizer(toks: Sequence[Any], base_root: Path | None, base: int, rows: Sequence[int]) -> Any:
    """The base's tokenizer with every other input's new tokens appended (in input order, ids ascending).

    An added token keeps its flags (special, stripping); a token of another input's learned vocabulary that
    the base lacks is added as a plain token (mergekit does the same). Tokens whose id has no embedding row in
    their input are skipped (mergekit too).
    """
    assert base_root is not None  # a union has checked every input has a tokenizer folder
    out = _load_tokenizer(base_root)  # a fresh copy: tokens are added to it, never to the inputs' objects
    have = set(out.get_vocab())
    new: list[Any] = []
    seen = {(id(toks[base]), rows[base])}
    for k, tok in enumerate(toks):
        if (id(tok), rows[k]) in seen:  # checkpoints of one run share a tokenizer object: look once
            continue
        seen.add((id(tok), rows[k]))
        added = {info.content: info for info in tok.added_tokens_decoder.values()}
        for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if t not in have and i < rows[k]:
                new.append(added.get(t, t))
                have.add(t)
    out.add_tokens(new)  # one call: ids follow the list's order
    return out


def _chosen_template(recipe: Recipe, inputs: Sequence[TensorSource], toks: Sequence[Any]) -> Any:
    """The chat template asked for by ``chat_template`` (None: keep the tokenizer source's as it is)."""
    choice = recipe.chat_template
    if choice is None:
        return None
    paths = recipe.input_paths()
    k = paths.index(choice) if choice != "base" else 0
    template = toks[k].chat_template if toks[k] is not None else None
    if not template:
        raise RecipeError(f"chat_template {choice!r}: {inputs[k].path} has no chat template in its tokenizer")
    return template


def write_tokenizer(tokenizer: Any, folder: Path) -> None:
    """Save ``tokenizer`` into an output folder, first removing tokenizer files copied there from an input."""
    for name in _TOKENIZER_SIDE_FILES:
        (folder / name).unlink(missing_ok=True)
    tokenizer.save_pretrained(str(folder))


def _read_rows(src: TensorSource, name: str, idx: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``idx`` of ``src``'s tensor ``name`` (zeros where ``idx`` is -1), one read per run of ids."""
    out = torch.zeros(len(idx), width, dtype=dtype)
    if len(idx) == 0:
        return out
    # a run is a stretch of consecutive ids: the usual map is the identity, read in one piece
    brk = torch.ones(len(idx), dtype=torch.bool)
    brk[1:] = (idx[1:] != idx[:-1] + 1) | ((idx[1:] < 0) != (idx[:-1] < 0))
    starts = torch.nonzero(brk).flatten().tolist() + [len(idx)]
    for a, b in itertools.pairwise(starts):
        first = int(idx[a])
        if first >= 0:
            out[a:b] = src.get(name, first * width, (first + b - a) * width).view(b - a, width)
    return out


def gather_rows(sources: Sequence[TensorSource], name: str, rmap: RowMap, width: int, start: int,
                stop: int) -> list[torch.Tensor]:
    """Flat elements ``[start, stop)`` of every input's tensor ``name`` laid out in the output vocabulary.

    Reads only the rows the range covers (one chunk per input). Missing rows are filled: the base's row, or
    the mean (fp32) of the rows of the inputs that have the token.

    Args:
        sources: the inputs, in the order of ``rmap``.
        name: a vocabulary tensor (see :func:`is_vocab_tensor`).
        rmap: its :class:`RowMap`.
        width: elements per row (the hidden size).
        start, stop: flat element range of the output tensor.

    Returns:
        One flat tensor per input, each in that input's dtype.

    Raises:
        CheckpointError: an output row that no input has (a bug in the plan, reported rather than zeroed).
    """
    r0, r1 = start // width, -(-stop // width)
    ids = torch.arange(r0, r1)
    blocks, masks = [], []
    for src, s in zip(sources, rmap.src):
        dtype = src.info(name).dtype
        if s is None:
            blocks.append(src.get(name, r0 * width, r1 * width).view(r1 - r0, width))
            masks.append(torch.ones(r1 - r0, dtype=torch.bool))
            continue
        sel = s[r0:r1]
        blocks.append(_read_rows(src, name, sel, width, dtype))
        masks.append(sel >= 0)
    if not all(bool(m.all()) for m in masks):
        blocks = _fill_missing(blocks, masks, rmap.base, name, ids)
    a = start - r0 * width
    return [b.reshape(-1)[a:a + stop - start] for b in blocks]


def _fill_missing(blocks: list[torch.Tensor], masks: list[torch.Tensor], base: int, name: str,
                  ids: torch.Tensor) -> list[torch.Tensor]:
    """Fill each input's missing rows: the base's row, else the mean of the inputs that have the row."""
    acc = torch.float64 if any(b.dtype == torch.float64 for b in blocks) else torch.float32
    count = torch.stack(masks).sum(0)
    if bool((count == 0).any()):
        row = int(ids[int(torch.nonzero(count == 0)[0])])
        raise CheckpointError(f"tensor {name!r}: no input has output row {row}")
    total = sum(torch.where(m[:, None], b.to(acc), 0) for b, m in zip(blocks, masks))
    fill = torch.where(masks[base][:, None], blocks[base].to(acc), total / count[:, None].to(acc))
    return [b if bool(m.all()) else torch.where(m[:, None], b, fill.to(b.dtype)) for b, m in zip(blocks, masks)]


def align_rows(rows: torch.Tensor, vocab: Mapping[str, int], target: Mapping[str, int],
               fill: torch.Tensor) -> torch.Tensor:
    """A fine-tune's embedding (or head) rows laid out in another vocabulary, tokens matched by string.

    The repair aligns a fine-tune that added tokens to its base with it: ``out[i]`` is the fine-tune's row for
    the token whose id in ``target`` is ``i``, or ``fill[i]`` (the base's row) when the fine-tune lacks that
    token (or has no row for it). Tokens the fine-tune has and ``target`` lacks are left out; name them with
    :func:`missing_tokens`. Ids of ``fill`` with no token in ``target`` (padding rows) keep ``fill``'s rows.

    Args:
        rows: ``[V_ft, H]`` the fine-tune's rows.
        vocab: the fine-tune's token string -> id (``tokenizer.get_vocab()``).
        target: the target (base) token string -> id.
        fill: ``[V_target, H]`` the rows used where the fine-tune has none; sets the output shape.

    Returns:
        ``[V_target, H]`` in ``rows``' dtype.

    Example:
        >>> ft = torch.tensor([[1.0], [2.0], [9.0]]); base = torch.zeros(2, 1)
        >>> align_rows(ft, {"b": 0, "a": 1, "<tool>": 2}, {"a": 0, "b": 1}, base).flatten().tolist()
        [2.0, 1.0]
    """
    out = fill.to(rows.dtype).clone()
    by_id = _inverse(target, out.shape[0])
    pairs = [(i, vocab[t]) for i, t in enumerate(by_id) if t is not None and vocab.get(t, rows.shape[0]) < rows.shape[0]]
    if pairs:
        dst, src = (torch.tensor(x, dtype=torch.int64) for x in zip(*pairs))
        out[dst] = rows[src]
    return out
