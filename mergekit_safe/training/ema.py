"""Online EMA of the weights during fine-tuning: the prevention side of the safety story.

The seed method keeps an exponential moving average of the weights in parameter space, started from the
weights the run begins with (the aligned model), while fine-tuning goes on::

    e_0 = theta_0                                   (the weights at the start of the run)
    e_n = beta_n * e_{n-1} + (1 - beta_n) * theta_n (after the n-th update; theta_n = the weights then)
        = (prod beta) * theta_0 + sum_i w_i * theta_i

With a constant ``beta`` the aligned start keeps weight ``beta**n`` after ``n`` updates; that term is what
holds the refusals in place, so warm-up (which forgets the start fast) is off by default.

Two entry points:

* :class:`ParameterEMA` for a plain PyTorch loop: call :meth:`ParameterEMA.update` after every
  ``optimizer.step()``.
* :class:`EMACallback` for the Hugging Face ``Trainer``: one line, ``callbacks=[EMACallback(beta=0.999)]``.
  It writes a normal HF checkpoint of the EMA weights beside every Trainer checkpoint
  (``checkpoint-N/ema/``) and at the end (``output_dir/ema``), so ``mergekit-safe eval`` and ``repair``
  read them directly, and it saves its state (``checkpoint-N/ema_state.pt``) so
  ``trainer.train(resume_from_checkpoint=...)`` continues the same average.

Only parameters with ``requires_grad=True`` are tracked: for full fine-tuning that is the whole model, for
a PEFT model it is the adapter (LoRA A/B and ``modules_to_save``). Frozen weights never change, so their
EMA is themselves.

Online and offline EMA (``mergekit-safe ema CKPT... --beta B --start START``, which computes
``e_0 = START, e_t = B * e_{t-1} + (1 - B) * c_t`` over saved checkpoints ``c_1..c_T``):

* **Exact.** An online EMA that updates only at the save points (``update_every == save_steps``, no
  warm-up) with decay ``b`` equals the offline EMA over those checkpoints with the *same* decay
  ``B = b``, started from the run's initial weights. Both run the same recursion on the same tensors
  (up to float rounding and the storage dtype).
* **Approximate.** An online EMA that updates every ``k`` steps while checkpoints are saved every
  ``K = m * k`` steps gives, per save interval,
  ``e_{jK} = b**m * e_{(j-1)K} + (1 - b) * sum_{i<m} b**i * theta_{jK - i*k}``,
  while the offline EMA with ``B = b**m`` gives ``B * e_prev + (1 - B) * c_j``. The two agree exactly
  only if the weights are constant inside each interval (``theta_{jK - i*k} == c_j``). Otherwise they differ
  by ``(1 - b) * sum_j B**(J-j) * sum_{i<m} b**i * (theta_{jK-i*k} - c_j)``, whose norm is at most the
  largest drift of the weights within one save interval (the weights in that sum add up to less than 1).
  The offline average also leans later: it puts an interval's whole mass ``1 - b**m`` on the interval's
  last checkpoint. :func:`offline_beta` returns ``b**m``.
* Warm-up changes ``beta`` per update, so it has no constant-decay offline twin.

Example:
    >>> from transformers import Trainer
    >>> from mergekit_safe.training.ema import EMACallback
    >>> trainer = Trainer(model, args, train_dataset=data, callbacks=[EMACallback(beta=0.999)])  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    >>> # output_dir/ema and output_dir/checkpoint-N/ema now hold the EMA weights
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from mergekit_safe import kernels
from mergekit_safe.errors import CheckpointError, RecipeError

STORAGE_DTYPES = ("fp32", "param")
STATE_FILE = "ema_state.pt"
EMA_DIR = "ema"
INFO_FILE = "mergekit_safe_ema.json"
_STATE_FORMAT = "mergekit-safe-ema/1"


@dataclass(frozen=True)
class EMAConfig:
    """Settings of an online EMA.

    Attributes:
        beta: decay in ``[0, 1]``; the EMA moves ``1 - beta`` of the way to the weights per update.
            Default 0.999 (an averaging window of about 1000 updates).
        update_every: update after every ``update_every``-th optimizer step (steps ``k, 2k, ...``).
            Set it to the Trainer's ``save_steps`` to make the online EMA equal the offline one exactly.
        warmup: use ``beta_n = min(beta, (1 + n) / (10 + n))`` for the update after ``n`` earlier
            updates (the TensorFlow ``num_updates`` schedule). It forgets the start weights quickly
            (``beta_0 = 0.1``), which defeats the safety use; keep it off unless the start is arbitrary.
        dtype: ``"fp32"`` keeps the EMA in float32 (default); ``"param"`` keeps it in each parameter's
            dtype. In bf16 a step of ``(1 - beta) * (theta - e)`` below half an ulp of ``e`` is lost, so a
            bf16 EMA with ``beta=0.999`` barely moves; use ``"param"`` only to save memory with fp32 weights
            or small betas.
        offload: keep the EMA on the CPU (saves accelerator memory; each update copies the tracked
            parameters to the host, so pair it with ``update_every > 1``).
    """

    beta: float = 0.999
    update_every: int = 1
    warmup: bool = False
    dtype: str = "fp32"
    offload: bool = False

    def problems(self) -> list[str]:
        """Every invalid setting, as messages that say what is allowed.

        Example:
            >>> EMAConfig(beta=2.0, update_every=0).problems()
            ['beta=2.0 is not in [0, 1]', 'update_every=0 is not an integer >= 1']
        """
        found = []
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not 0.0 <= self.beta <= 1.0:
            found.append(f"beta={self.beta!r} is not in [0, 1]")
        if isinstance(self.update_every, bool) or not isinstance(self.update_every, int) or self.update_every < 1:
            found.append(f"update_every={self.update_every!r} is not an integer >= 1")
        if self.dtype not in STORAGE_DTYPES:
            found.append(f"dtype={self.dtype!r} is not one of {', '.join(STORAGE_DTYPES)}")
        return found

    def validate(self) -> None:
        """Raise on any invalid setting.

        Raises:
            RecipeError: listing every problem at once.

        Example:
            >>> EMAConfig(beta=0.99).validate()
        """
        found = self.problems()
        if found:
            raise RecipeError(found, source="EMA")

    def beta_at(self, num_updates: int) -> float:
        """The decay used by the update that follows ``num_updates`` earlier updates.

        Example:
            >>> EMAConfig(beta=0.99, warmup=True).beta_at(0)
            0.1
            >>> EMAConfig(beta=0.99).beta_at(0)
            0.99
        """
        if not self.warmup:
            return float(self.beta)
        return min(float(self.beta), (1.0 + num_updates) / (10.0 + num_updates))


def offline_beta(online_beta: float, save_steps: int, update_every: int = 1) -> float:
    """Per-checkpoint decay of the offline EMA that matches an online EMA.

    With ``m = save_steps / update_every`` online updates per save interval this is ``online_beta**m``.
    It is exact when ``update_every == save_steps`` (then ``m = 1`` and the betas are equal). For ``m > 1``
    it is exact only if the weights do not change between the online updates inside a save interval;
    otherwise the two averages differ by at most the largest weight drift within one interval (see the
    module docstring).

    Args:
        online_beta: decay per online update, in ``[0, 1]``.
        save_steps: optimizer steps between saved checkpoints.
        update_every: optimizer steps between online updates; must divide ``save_steps``.

    Returns:
        The decay to pass to ``mergekit-safe ema --beta``.

    Raises:
        RecipeError: a value is out of range or ``update_every`` does not divide ``save_steps``.

    Example:
        >>> offline_beta(0.9, save_steps=10, update_every=10)
        0.9
        >>> round(offline_beta(0.9, save_steps=2), 6)
        0.81
    """
    found = EMAConfig(beta=online_beta, update_every=update_every).problems()
    if isinstance(save_steps, bool) or not isinstance(save_steps, int) or save_steps < 1:
        found.append(f"save_steps={save_steps!r} is not an integer >= 1")
    elif not found and save_steps % update_every:
        found.append(f"update_every={update_every} does not divide save_steps={save_steps}; pick a divisor")
    if found:
        raise RecipeError(found, source="offline_beta")
    return float(online_beta) ** (save_steps // update_every)


def _trainable(model: nn.Module | Iterable[tuple[str, nn.Parameter]]) -> list[tuple[str, nn.Parameter]]:
    named = model.named_parameters() if isinstance(model, nn.Module) else model
    return [(name, p) for name, p in named if p.requires_grad]


@dataclass
class _Group:
    """Tensors that one multi-tensor call can update: same device and dtype on each side."""

    shadow: list[torch.Tensor]
    params: list[torch.Tensor]


def _groups(shadow: list[torch.Tensor], params: list[torch.Tensor]) -> list[_Group]:
    by_key: dict[tuple, _Group] = {}
    for e, p in zip(shadow, params):
        key = (e.device, e.dtype, p.device, p.dtype)
        by_key.setdefault(key, _Group([], [])).shadow.append(e)
        by_key[key].params.append(p)
    return list(by_key.values())


def _lerp_group(group: _Group, beta: float) -> None:
    """``e = beta * e + (1 - beta) * theta`` for one group, as one multi-tensor call."""
    params = [p.detach() for p in group.params]
    e0, p0 = group.shadow[0], params[0]
    if e0.device == p0.device and kernels.select_backend(e0, p0) == "triton":
        # One launch for all tensors; fp32 math whatever the storage dtypes are.
        pairs = [[e, p] for e, p in zip(group.shadow, params)]
        kernels.foreach_weighted_sum_(group.shadow, pairs, [[beta, 1.0 - beta]] * len(pairs))
        return
    if p0.device != e0.device or p0.dtype != e0.dtype:
        # _foreach_lerp_ wants one device and dtype; this copy is the price of offload / fp32 storage on CPU.
        params = [p.to(device=e0.device, dtype=e0.dtype) for p in params]
    torch._foreach_lerp_(group.shadow, params, 1.0 - beta)


class ParameterEMA:
    """Exponential moving average of a model's trainable parameters, for custom training loops.

    ``update()`` after every optimizer step applies ``e = beta_n * e + (1 - beta_n) * theta`` on every
    ``update_every``-th step (see :class:`EMAConfig` for ``beta_n``). The EMA starts from the parameters'
    values when this object is built. On CUDA the update is one fused multi-tensor launch
    (:func:`mergekit_safe.kernels.foreach_weighted_sum_`); on CPU it is ``torch._foreach_lerp_``.

    Args:
        model: a module (its parameters with ``requires_grad=True`` are tracked, e.g. only the adapter of
            a PEFT model) or ``(name, parameter)`` pairs.
        beta: decay, default 0.999.
        update_every: update on every ``update_every``-th step, default 1.
        warmup: use the ``min(beta, (1 + n) / (10 + n))`` schedule, default False.
        dtype: ``"fp32"`` (default) or ``"param"``: the storage dtype of the EMA.
        offload: keep the EMA on the CPU, default False.

    Attributes:
        names: tracked parameter names, in order.
        step: optimizer steps counted so far.
        num_updates: EMA updates applied so far.

    Raises:
        RecipeError: invalid settings, or nothing to track.

    Example:
        >>> model = torch.nn.Linear(4, 4)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> ema = ParameterEMA(model, beta=0.99)
        >>> model(torch.ones(1, 4)).sum().backward(); opt.step()
        >>> ema.update()
        True
        >>> with ema.swap():
        ...     y = model(torch.ones(1, 4))  # evaluated with the EMA weights
    """

    def __init__(
        self,
        model: nn.Module | Iterable[tuple[str, nn.Parameter]],
        beta: float = 0.999,
        *,
        update_every: int = 1,
        warmup: bool = False,
        dtype: str = "fp32",
        offload: bool = False,
    ) -> None:
        self.config = EMAConfig(beta=beta, update_every=update_every, warmup=warmup, dtype=dtype, offload=offload)
        self.config.validate()
        named = _trainable(model)
        if not named:
            raise RecipeError("the model has no trainable parameters (requires_grad=True) to average", source="EMA")
        self.module = model if isinstance(model, nn.Module) else None
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        with torch.no_grad():
            self.shadow = [self._new_shadow(p) for p in self.params]
        self._groups = _groups(self.shadow, self.params)
        self.step = 0
        self.num_updates = 0

    def _new_shadow(self, p: torch.Tensor) -> torch.Tensor:
        dtype = torch.float32 if self.config.dtype == "fp32" else p.dtype
        device = torch.device("cpu") if self.config.offload else p.device
        return p.detach().to(device=device, dtype=dtype, copy=True)

    @property
    def beta(self) -> float:
        """The decay the next update will use (``beta`` itself unless warm-up is on)."""
        return self.config.beta_at(self.num_updates)

    def update(self, step: int | None = None) -> bool:
        """Count one optimizer step and update the EMA if the step is due.

        Args:
            step: the optimizer step just taken (1-based), e.g. the Trainer's ``global_step``; None counts
                one more than the last.

        Returns:
            True when the EMA was updated (``step % update_every == 0``).

        Example:
            >>> ema = ParameterEMA(torch.nn.Linear(2, 2), beta=0.9, update_every=2)
            >>> ema.update(), ema.update()
            (False, True)
        """
        self.step = self.step + 1 if step is None else int(step)
        if self.step % self.config.update_every:
            return False
        beta = self.beta
        with torch.no_grad():
            for group in self._groups:
                _lerp_group(group, beta)
        self.num_updates += 1
        return True

    def state_dict(self) -> dict[str, Any]:
        """The EMA tensors (by parameter name), counters and settings; the tensors are not copied.

        Example:
            >>> sorted(ParameterEMA(torch.nn.Linear(2, 2)).state_dict())
            ['beta', 'dtype', 'format', 'num_updates', 'shadow', 'step', 'update_every', 'warmup']
        """
        return {
            "format": _STATE_FORMAT,
            "beta": float(self.config.beta),
            "update_every": self.config.update_every,
            "warmup": self.config.warmup,
            "dtype": self.config.dtype,
            "step": self.step,
            "num_updates": self.num_updates,
            "shadow": dict(zip(self.names, self.shadow)),
        }

    def load_state_dict(self, state: dict[str, Any], source: str = "state dict") -> None:
        """Restore tensors, counters and ``beta`` / ``update_every`` / ``warmup`` from :meth:`state_dict`.

        The storage dtype and device stay this object's own (tensors are cast on the way in).

        Args:
            state: what :meth:`state_dict` returned (possibly via :meth:`save` / :meth:`load`).
            source: where it came from, for error messages.

        Raises:
            CheckpointError: the state is not an EMA state, or its names or shapes differ from the
                tracked parameters.

        Example:
            >>> a = ParameterEMA(torch.nn.Linear(2, 2)); b = ParameterEMA(torch.nn.Linear(2, 2))
            >>> b.load_state_dict(a.state_dict())
        """
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise CheckpointError(f"{source}: not a mergekit-safe EMA state (format {_STATE_FORMAT!r} expected)")
        shadow = state["shadow"]
        _check_names(self.names, self.shadow, shadow, source)
        saved = dataclasses.replace(
            self.config, beta=float(state["beta"]), update_every=int(state["update_every"]), warmup=bool(state["warmup"])
        )
        if saved != self.config:
            warnings.warn(
                f"{source}: restoring beta={saved.beta}, update_every={saved.update_every}, warmup={saved.warmup} "
                f"saved with the EMA (given: beta={self.config.beta}, update_every={self.config.update_every}, "
                f"warmup={self.config.warmup})",
                stacklevel=2,
            )
        saved.validate()
        self.config = saved
        with torch.no_grad():
            for name, e in zip(self.names, self.shadow):
                e.copy_(shadow[name])
        self.step = int(state["step"])
        self.num_updates = int(state["num_updates"])

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`state_dict` to ``path`` (``torch.save``; tensors moved to the CPU).

        Example:
            >>> ParameterEMA(torch.nn.Linear(2, 2)).save("/tmp/ema_state.pt")  # doctest: +SKIP
        """
        state = self.state_dict()
        state["shadow"] = {name: t.detach().cpu() for name, t in state["shadow"].items()}
        torch.save(state, path)

    def load(self, path: str | os.PathLike) -> None:
        """Restore what :meth:`save` wrote.

        Raises:
            CheckpointError: the file is missing or does not match the tracked parameters.

        Example:
            >>> ema.load("checkpoint-100/ema_state.pt")  # doctest: +SKIP
        """
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: EMA state file not found")
        # weights_only: the file holds tensors and plain values, never code.
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), source=str(path))

    def _targets(self, model: nn.Module | None) -> list[torch.Tensor]:
        if model is None:
            return self.params
        found = dict(model.named_parameters())
        _check_names(self.names, self.shadow, found, f"model {type(model).__name__}", extra_ok=True)
        return [found[name] for name in self.names]

    def copy_to(self, model: nn.Module | None = None) -> None:
        """Overwrite parameters with the EMA values (cast to their dtype and device).

        Args:
            model: a module whose parameter names match (e.g. a fresh copy for evaluation); None writes the
                tracked parameters themselves (training then continues from the EMA weights).

        Raises:
            CheckpointError: ``model`` lacks a tracked name or has another shape for it.

        Example:
            >>> ema.copy_to(eval_model)  # doctest: +SKIP
        """
        targets = self._targets(model)
        with torch.no_grad():
            for p, e in zip(targets, self.shadow):
                p.copy_(e)

    @contextlib.contextmanager
    def swap(self, model: nn.Module | None = None) -> Iterator[nn.Module | None]:
        """Context manager: the EMA weights are in the model inside, the training weights come back after.

        The training weights are kept in a copy (on the CPU when ``offload`` is set) and restored bit for
        bit, also when the block raises.

        Example:
            >>> with ema.swap(model):  # doctest: +SKIP
            ...     metrics = evaluate(model)
        """
        targets = self._targets(model)
        backup_device = torch.device("cpu") if self.config.offload else None
        with torch.no_grad():
            backup = [p.detach().to(device=backup_device or p.device, copy=True) for p in targets]
            for p, e in zip(targets, self.shadow):
                p.copy_(e)
        try:
            yield model if model is not None else self.module
        finally:
            with torch.no_grad():
                for p, b in zip(targets, backup):
                    p.copy_(b)

    def save_pretrained(
        self,
        save_dir: str | os.PathLike,
        model: nn.Module | None = None,
        processing_class: Any | None = None,
    ) -> None:
        """Write the EMA weights as a normal Hugging Face checkpoint (safetensors + config).

        ``model.save_pretrained`` runs inside :meth:`swap`, so a full model gives a full checkpoint in the
        model's dtype and a PEFT model gives an adapter (``adapter_model.safetensors`` +
        ``adapter_config.json``) holding the EMA of the adapter weights. ``mergekit_safe_ema.json`` records
        beta and the counters.

        Merging a PEFT EMA adapter into the base model::

            base = AutoModelForCausalLM.from_pretrained(BASE)
            merged = PeftModel.from_pretrained(base, "output_dir/ema").merge_and_unload()
            merged.save_pretrained("output_dir/ema-merged")

        That gives ``W0 + s * EMA(B) @ EMA(A)``, the EMA taken in the adapter's parameter space. It is not
        the EMA of the merged weights ``W0 + s * EMA(B @ A)``: the two differ by the weighted covariance of
        the B and A trajectories, small while the factors drift slowly. Both start from ``B = 0``, i.e. the
        aligned base model.

        Args:
            save_dir: output folder (created).
            model: the module to save; None uses the module this EMA was built from.
            processing_class: a tokenizer or processor to save beside the weights, if any.

        Raises:
            RecipeError: no model given and the EMA was built from parameter pairs.

        Example:
            >>> ema.save_pretrained("run/ema", model, tokenizer)  # doctest: +SKIP
        """
        model = model if model is not None else self.module
        if model is None or not hasattr(model, "save_pretrained"):
            raise RecipeError("save_pretrained needs a Hugging Face or PEFT model (pass model=...)", source="EMA")
        os.makedirs(save_dir, exist_ok=True)
        with self.swap(model):
            model.save_pretrained(save_dir)
        if processing_class is not None:
            processing_class.save_pretrained(save_dir)
        info = {k: v for k, v in self.state_dict().items() if k != "shadow"}
        with open(os.path.join(save_dir, INFO_FILE), "w") as f:
            json.dump(info, f, indent=2)


def _check_names(
    names: list[str], shadow: list[torch.Tensor], found: dict[str, Any], source: str, extra_ok: bool = False
) -> None:
    missing = [n for n in names if n not in found]
    unexpected = [] if extra_ok else sorted(set(found) - set(names))
    shapes = [
        f"{n}: {tuple(found[n].shape)} vs {tuple(e.shape)}"
        for n, e in zip(names, shadow)
        if n in found and tuple(found[n].shape) != tuple(e.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tracked parameter(s), e.g. {', '.join(missing[:3])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected name(s), e.g. {', '.join(unexpected[:3])}")
    if shapes:
        problems.append(f"shape mismatch (found vs EMA) for {'; '.join(shapes[:3])}")
    if problems:
        raise CheckpointError(
            f"{source} does not match the EMA's {len(names)} tracked parameters: {'; '.join(problems)}. "
            "Build the EMA on the same model with the same trainable parameters."
        )


def _drop_stray_ema_adapter(model: nn.Module, name: str) -> None:
    """Undo Trainer's resume side effect on PEFT models.

    On resume, ``Trainer._load_from_checkpoint`` loads every checkpoint subfolder that holds adapter weights
    as an extra adapter named after the folder, which picks up our ``checkpoint-N/ema`` adapter. It is not
    active and not trainable; delete it so later checkpoints do not save it again.
    """
    peft_config = getattr(model, "peft_config", None)
    if not (isinstance(peft_config, dict) and name in peft_config and len(peft_config) > 1):
        return
    active = model.active_adapters
    # A PeftModel has a property; transformers' own adapter mixin has a method of the same name.
    active = active() if callable(active) else active
    if name not in active:
        model.delete_adapter(name)


class EMACallback(TrainerCallback):
    """Hugging Face ``Trainer`` callback that keeps an online EMA of the trainable weights.

    The EMA starts from the weights at ``on_train_begin`` and is updated at the end of every optimizer
    step (``state.global_step % update_every == 0``). On each Trainer save it writes
    ``checkpoint-N/ema/`` (a normal HF checkpoint of the EMA weights, plus the tokenizer if the Trainer
    has one; an adapter for PEFT models) and ``checkpoint-N/ema_state.pt`` (EMA tensors in their storage
    dtype, step count, beta). At the end of training it writes ``output_dir/ema``. Resuming with
    ``trainer.train(resume_from_checkpoint=...)`` restores the state from ``checkpoint-N/ema_state.pt``.

    Args:
        beta: decay, default 0.999.
        update_every: update every this many optimizer steps; set to ``save_steps`` for an exact match
            with ``mergekit-safe ema`` over the checkpoints at the same beta.
        warmup: ``min(beta, (1 + n) / (10 + n))`` schedule, default False.
        dtype: ``"fp32"`` (default) or ``"param"``.
        offload: keep the EMA on the CPU.
        save_checkpoints: write ``ema/`` and ``ema_state.pt`` into each Trainer checkpoint, default True.
        final_dir: folder under ``output_dir`` for the final EMA checkpoint; None skips it.
        resume_from: checkpoint folder to restore the EMA from when resuming; None looks in
            ``output_dir/checkpoint-{global_step}`` (pass it when resuming from a folder elsewhere).

    Attributes:
        ema: the :class:`ParameterEMA`, built at ``on_train_begin``.

    Raises:
        RecipeError: invalid settings.
        CheckpointError: (at resume) no EMA state in the checkpoint, or it does not match the model.

    Example:
        >>> trainer = Trainer(model, args, train_dataset=data, callbacks=[EMACallback(beta=0.999)])  # doctest: +SKIP
        >>> trainer.train(resume_from_checkpoint=True)  # doctest: +SKIP
    """

    def __init__(
        self,
        beta: float = 0.999,
        *,
        update_every: int = 1,
        warmup: bool = False,
        dtype: str = "fp32",
        offload: bool = False,
        save_checkpoints: bool = True,
        final_dir: str | None = EMA_DIR,
        resume_from: str | os.PathLike | None = None,
    ) -> None:
        self.config = EMAConfig(beta=beta, update_every=update_every, warmup=warmup, dtype=dtype, offload=offload)
        self.config.validate()
        self.save_checkpoints = save_checkpoints
        self.final_dir = final_dir
        self.resume_from = resume_from
        self.ema: ParameterEMA | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):  # noqa: D102 (Trainer hook)
        if state.global_step > 0:
            _drop_stray_ema_adapter(model, EMA_DIR)
        self.ema = ParameterEMA(model, **dataclasses.asdict(self.config))
        if state.global_step > 0:
            self._restore(args.output_dir, state.global_step)

    def _restore(self, output_dir: str, global_step: int) -> None:
        folder = self.resume_from or os.path.join(output_dir, f"{PREFIX_CHECKPOINT_DIR}-{global_step}")
        path = os.path.join(folder, STATE_FILE)
        if not os.path.isfile(path):
            raise CheckpointError(
                f"{path}: resuming at step {global_step} but the checkpoint has no EMA state; it was saved "
                "without EMACallback, or it lives outside output_dir (pass EMACallback(resume_from=CHECKPOINT))"
            )
        self.ema.load(path)
        if self.ema.step != global_step:
            raise CheckpointError(
                f"{path}: EMA state is at step {self.ema.step} but the Trainer resumes at step {global_step}; "
                "pass resume_from= the checkpoint you resume from"
            )

    def on_step_end(self, args, state, control, **kwargs):  # noqa: D102
        self.ema.update(step=state.global_step)

    def on_save(self, args, state, control, model=None, processing_class=None, **kwargs):  # noqa: D102
        if not (self.save_checkpoints and args.should_save):
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):
            # Hyper-parameter search writes checkpoints under a per-trial run folder we cannot see here.
            warnings.warn(f"{folder}: no Trainer checkpoint there; EMA not saved for step {state.global_step}")
            return
        self.ema.save(os.path.join(folder, STATE_FILE))
        self.ema.save_pretrained(os.path.join(folder, EMA_DIR), model, processing_class)

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):  # noqa: D102
        if self.final_dir and args.should_save:
            self.ema.save_pretrained(os.path.join(args.output_dir, self.final_dir), model, processing_class)


__all__ = ["EMACallback", "EMAConfig", "ParameterEMA", "offline_beta"]
