"""Online EMA (mergekit_safe.training.ema): math against float64 references, storage, state, Trainer, PEFT.

Run: OMP_NUM_THREADS=1 pytest tests/test_training.py
"""

from __future__ import annotations

import glob
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file

from mergekit_safe.errors import CheckpointError, RecipeError
from mergekit_safe.training.ema import (
    EMA_DIR,
    INFO_FILE,
    STATE_FILE,
    EMACallback,
    EMAConfig,
    ParameterEMA,
    offline_beta,
)
from tests.helpers import assert_close

# fp32 storage: each update rounds once (|err| <= 2**-24 relative); a handful of updates stays below 1e-6.
FP32_TOL = {"atol": 1e-6, "rtol": 1e-6}
# Trainer runs in fp32; online recursion vs a float64 recursion over checkpoints read back from disk.
TRAIN_TOL = {"atol": 1e-6, "rtol": 1e-5}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


class _Toy(torch.nn.Module):
    """Parameters with awkward shapes: non-power-of-two 2-D, a single element, an empty one, a frozen one."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(5, 3, dtype=dtype))
        self.b = torch.nn.Parameter(torch.randn(1, dtype=dtype))
        self.empty = torch.nn.Parameter(torch.randn(0, dtype=dtype))
        self.frozen = torch.nn.Parameter(torch.randn(4, dtype=dtype), requires_grad=False)


def _randomize_(model: torch.nn.Module) -> None:
    """Stand-in for an optimizer step: new trainable weights."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p))


def _trainable64(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().double().clone() for n, p in model.named_parameters() if p.requires_grad}


def _check_shadow(ema: ParameterEMA, ref: dict[str, torch.Tensor], tol: dict[str, float]) -> None:
    state = ema.state_dict()["shadow"]
    assert list(state) == list(ref)
    for name, t in state.items():
        assert_close(t, ref[name], what=name, **tol)


def test_hand_computed_scalar() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    ema = ParameterEMA([("p", p)], beta=0.5)
    for value in (1.0, 2.0):
        p.data.fill_(value)
        ema.update()
    # e1 = 0.5 * 0 + 0.5 * 1 = 0.5; e2 = 0.5 * 0.5 + 0.5 * 2 = 1.25
    assert ema.shadow[0].item() == 1.25
    assert (ema.step, ema.num_updates) == (2, 2)


@pytest.mark.parametrize("warmup", [False, True])
@pytest.mark.parametrize("update_every", [1, 3])
def test_update_matches_float64_reference(warmup: bool, update_every: int) -> None:
    model = _Toy()
    ema = ParameterEMA(model, beta=0.9, update_every=update_every, warmup=warmup)
    assert ema.names == ["w", "b", "empty"], "frozen parameters are not tracked"
    ref, n = _trainable64(model), 0
    for step in range(1, 8):
        _randomize_(model)
        updated = ema.update()
        assert updated == (step % update_every == 0)
        if updated:
            beta = min(0.9, (1 + n) / (10 + n)) if warmup else 0.9
            ref = {k: beta * ref[k] + (1 - beta) * v for k, v in _trainable64(model).items()}
            n += 1
        _check_shadow(ema, ref, FP32_TOL)
    assert ema.num_updates == n


def test_warmup_schedule() -> None:
    config = EMAConfig(beta=0.9, warmup=True)
    assert [round(config.beta_at(n), 6) for n in (0, 1, 2, 80)] == [0.1, round(2 / 11, 6), 0.25, 0.9]


def test_fp32_storage_of_bf16_params() -> None:
    model = _Toy(torch.bfloat16)
    ema = ParameterEMA(model, beta=0.9)
    assert {t.dtype for t in ema.shadow} == {torch.float32}
    ref = _trainable64(model)
    for _ in range(4):
        _randomize_(model)
        ema.update()
        ref = {k: 0.9 * ref[k] + 0.1 * v for k, v in _trainable64(model).items()}
    _check_shadow(ema, ref, FP32_TOL)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters()), "the model keeps its dtype"


def test_param_dtype_storage_rounds_each_update() -> None:
    model = _Toy(torch.bfloat16)
    ema = ParameterEMA(model, beta=0.9, dtype="param")
    assert {t.dtype for t in ema.shadow} == {torch.bfloat16}
    ref = {k: v.bfloat16() for k, v in _trainable64(model).items()}
    for _ in range(4):
        _randomize_(model)
        ema.update()
        ref = {k: (0.9 * ref[k].double() + 0.1 * v).bfloat16() for k, v in _trainable64(model).items()}
    # The reference rounds to bf16 after every update as the EMA does; the fp32 lerp inside may round the
    # other way at a tie, so allow one bf16 ulp (2**-7 relative, 2**-8 spacing near the smallest values).
    _check_shadow(ema, ref, {"atol": 2**-8, "rtol": 2**-7})


def test_bf16_storage_stalls_where_fp32_moves() -> None:
    """Why fp32 is the default: a 0.1% step of a one-ulp gap vanishes in bf16."""
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    ema32, ema16 = ParameterEMA([("p", p)], beta=0.999), ParameterEMA([("p", p)], beta=0.999, dtype="param")
    p.data.fill_(1 + 2**-7)  # the next bf16 value after 1
    for _ in range(100):
        ema32.update()
        ema16.update()
    assert torch.equal(ema16.shadow[0], torch.ones(3, dtype=torch.bfloat16))
    expected = 1 + 2**-7 * (1 - 0.999**100)
    assert_close(ema32.shadow[0], torch.full((3,), expected), what="fp32", **FP32_TOL)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: offloading moves nothing on a CPU")
def test_offload_keeps_ema_on_cpu() -> None:
    """A CUDA model: the offloaded EMA lives on the CPU and agrees with the one kept on the device."""
    model = _Toy().cuda()
    device_ema, cpu_ema = ParameterEMA(model, beta=0.8), ParameterEMA(model, beta=0.8, offload=True)
    for _ in range(3):
        _randomize_(model)
        device_ema.update()
        cpu_ema.update()
    assert all(t.device.type == "cpu" for t in cpu_ema.shadow)
    assert all(t.device.type == "cuda" for t in device_ema.shadow)
    for a, b in zip(cpu_ema.shadow, device_ema.shadow):
        # the same fp32 recurrence on two backends (torch on the CPU, the kernel on the GPU): rounding only
        assert_close(a, b, what="offloaded vs device EMA", **FP32_TOL)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("offload", [False, True])
def test_cuda_update_matches_reference(offload: bool) -> None:
    model = _Toy(torch.bfloat16).cuda()
    ema = ParameterEMA(model, beta=0.9, offload=offload)
    assert all(t.device.type == ("cpu" if offload else "cuda") for t in ema.shadow)
    ref = _trainable64(model)
    for _ in range(3):
        _randomize_(model)
        ema.update()
        ref = {k: 0.9 * ref[k] + 0.1 * v for k, v in _trainable64(model).items()}
    _check_shadow(ema, ref, FP32_TOL)


_TRITON_PATH_SCRIPT = """
import torch
from mergekit_safe import kernels
from mergekit_safe.training.ema import ParameterEMA
launches = []
apply_kernels = kernels.kernel_module("apply")
launch = apply_kernels.foreach_weighted_sum_
apply_kernels.foreach_weighted_sum_ = lambda *a: (launches.append(len(a[0])), launch(*a))
torch.manual_seed(0)
ps = [torch.nn.Parameter(torch.randn(s, dtype=torch.bfloat16)) for s in ((5, 3), (1,), (0,), (130,))]
ema = ParameterEMA([(str(i), p) for i, p in enumerate(ps)], beta=0.9)
ref = [p.detach().double() for p in ps]
with kernels.use_backend("triton"):  # what the CLI's --backend / MERGEKIT_SAFE_BACKEND opens
    for _ in range(3):
        for p in ps:
            p.data.copy_(torch.randn_like(p))
        ema.update()
        ref = [0.9 * r + 0.1 * p.detach().double() for r, p in zip(ref, ps)]
err = max(((e.double() - r).abs().max().item() if r.numel() else 0.0) for e, r in zip(ema.shadow, ref))
assert all(e.dtype == torch.float32 for e in ema.shadow)
assert launches == [4, 4, 4], launches  # one multi-tensor launch per update, all four tensors in it
print("maxerr", err)
assert err < 1e-6, err
"""


def test_kernel_path_under_triton_interpreter() -> None:
    """The GPU code path (kernels.foreach_weighted_sum_, EMA aliased as output) on CPU via TRITON_INTERPRET.

    A subprocess, because TRITON_INTERPRET must be set before triton is first imported.
    """
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, "-c", _TRITON_PATH_SCRIPT], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "maxerr" in done.stdout


def test_state_dict_round_trip(tmp_path) -> None:
    model = _Toy()
    ema = ParameterEMA(model, beta=0.7, update_every=2)
    for _ in range(5):
        _randomize_(model)
        ema.update()
    ema.save(tmp_path / STATE_FILE)
    other = ParameterEMA(model, beta=0.7, update_every=2)
    other.load(tmp_path / STATE_FILE)
    assert (other.step, other.num_updates, other.beta) == (5, 2, 0.7)
    for a, b in zip(ema.shadow, other.shadow):
        assert torch.equal(a, b)
    _randomize_(model)  # both continue identically
    assert ema.update() == other.update() is True
    for a, b in zip(ema.shadow, other.shadow):
        assert torch.equal(a, b)


def test_load_restores_saved_beta_with_a_warning() -> None:
    model = _Toy()
    state = ParameterEMA(model, beta=0.5).state_dict()
    other = ParameterEMA(model, beta=0.99)
    with pytest.warns(UserWarning, match="restoring beta=0.5"):
        other.load_state_dict(state)
    assert other.beta == 0.5


def test_load_state_dict_mismatch_message() -> None:
    state = ParameterEMA(_Toy()).state_dict()
    state["shadow"] = {"w": torch.zeros(2, 2), "extra": torch.zeros(1)}
    with pytest.raises(CheckpointError) as err:
        ParameterEMA(_Toy()).load_state_dict(state, source="ckpt/ema_state.pt")
    assert str(err.value) == (
        "ckpt/ema_state.pt does not match the EMA's 3 tracked parameters: missing 2 tracked parameter(s), e.g. b, "
        "empty; 1 unexpected name(s), e.g. extra; shape mismatch (found vs EMA) for w: (2, 2) vs (5, 3). "
        "Build the EMA on the same model with the same trainable parameters."
    )


def test_swap_and_copy_to() -> None:
    model = _Toy()
    ema = ParameterEMA(model, beta=0.5)
    _randomize_(model)
    ema.update()
    training = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ema.swap() as swapped:
        assert swapped is model
        for name, e in zip(ema.names, ema.shadow):
            assert torch.equal(getattr(model, name), e)
    for name, p in model.named_parameters():
        assert torch.equal(p, training[name]), f"{name} not restored after swap"
    copy = _Toy()
    ema.copy_to(copy)
    assert torch.equal(copy.w, ema.shadow[0])
    assert not torch.equal(copy.frozen, model.frozen), "untracked parameters are left alone"


def test_swap_restores_on_error() -> None:
    model = _Toy()
    ema = ParameterEMA(model, beta=0.5)
    _randomize_(model)
    before = model.w.detach().clone()
    with pytest.raises(RuntimeError), ema.swap():
        raise RuntimeError("eval failed")
    assert torch.equal(model.w, before)


def test_invalid_settings_listed_at_once() -> None:
    with pytest.raises(RecipeError) as err:
        ParameterEMA(_Toy(), beta=1.5, update_every=0, dtype="fp16")
    assert str(err.value) == (
        "EMA: beta=1.5 is not in [0, 1]; update_every=0 is not an integer >= 1; dtype='fp16' is not one of fp32, param"
    )
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(RecipeError, match="no trainable parameters"):
        ParameterEMA(frozen)


def test_offline_beta() -> None:
    assert offline_beta(0.9, save_steps=5, update_every=5) == 0.9
    assert offline_beta(0.9, save_steps=4, update_every=2) == pytest.approx(0.81)
    assert offline_beta(0.99, save_steps=10) == pytest.approx(0.99**10)
    with pytest.raises(RecipeError) as err:
        offline_beta(0.9, save_steps=5, update_every=2)
    assert str(err.value) == "offline_beta: update_every=2 does not divide save_steps=5; pick a divisor"


def test_offline_beta_power_is_exact_only_for_constant_weights_between_saves() -> None:
    """Online every step with b vs offline over every K-th iterate with b**K: the documented bound."""
    beta, save_every, steps = 0.9, 4, 12
    p = torch.nn.Parameter(torch.zeros(6))
    for piecewise in (True, False):
        walk = torch.randn(steps, 6).double().cumsum(0)
        if piecewise:  # weights constant inside each save interval: equal to that interval's checkpoint
            walk = walk[save_every - 1 :: save_every].repeat_interleave(save_every, 0)
        p.data.zero_()
        ema = ParameterEMA([("p", p)], beta=beta)
        for theta in walk:
            p.data.copy_(theta)
            ema.update()
        offline, big = torch.zeros(6, dtype=torch.float64), offline_beta(beta, save_every)
        for c in walk[save_every - 1 :: save_every]:
            offline = big * offline + (1 - big) * c
        diff = (ema.shadow[0].double() - offline).abs().max().item()
        windows = walk.view(-1, save_every, 6)
        drift = (windows - windows[:, -1:]).abs().max().item()
        if piecewise:
            assert diff < 1e-5
        else:
            assert 1e-3 < diff <= drift


# ---------------------------------------------------------------------------------------------------------
# Hugging Face Trainer and PEFT on a tiny Llama.


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=64,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, **{f"t{i}": i for i in range(2, 64)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 16, length: int = 8) -> None:
        self.ids = torch.randint(2, 64, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _train(model, out, callback, *, max_steps=6, save_steps=2, stop_at=None, resume=None, lr=1e-2):
    """One Trainer run; ``stop_at`` ends it early after that step's checkpoint (a kill, as far as state goes)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if stop_at is not None and state.global_step >= stop_at:
                control.should_training_stop = True

    args = TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        save_strategy="steps",
        save_steps=save_steps,
        per_device_train_batch_size=2,
        learning_rate=lr,
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_Tokens(),
        data_collator=default_data_collator,
        processing_class=_tokenizer(),
        callbacks=[callback, StopAt()],
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _load_dir(folder) -> dict[str, torch.Tensor]:
    files = sorted(glob.glob(os.path.join(str(folder), "*.safetensors")))
    assert files, f"no safetensors in {folder}"
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(f))
    return out


def test_trainer_writes_ema_and_resume_matches_uninterrupted(tmp_path) -> None:
    full = EMACallback(beta=0.7)
    _train(_tiny_llama(), tmp_path / "full", full)

    _train(_tiny_llama(), tmp_path / "cut", EMACallback(beta=0.7), stop_at=4)
    ckpt = tmp_path / "cut" / "checkpoint-4"
    assert (ckpt / STATE_FILE).is_file() and not (tmp_path / "cut" / "checkpoint-6").exists()
    resumed = EMACallback(beta=0.7)
    trainer = _train(_tiny_llama(), tmp_path / "cut", resumed, resume=str(ckpt))

    uninterrupted = dict(zip(full.ema.names, full.ema.params))
    for name, p in trainer.model.named_parameters():  # the training itself resumes exactly ...
        assert_close(p, uninterrupted[name], what=name, atol=0, rtol=0)
    assert (resumed.ema.step, resumed.ema.num_updates) == (6, 6)
    for name, a, b in zip(full.ema.names, full.ema.shadow, resumed.ema.shadow):  # ... and so does the EMA
        assert_close(b, a, what=name, atol=0, rtol=0)

    ema_dir = tmp_path / "full" / EMA_DIR
    for f in ("config.json", "model.safetensors", "tokenizer.json", INFO_FILE):
        assert (ema_dir / f).is_file(), f
        assert (tmp_path / "full" / "checkpoint-2" / EMA_DIR / f).is_file(), f
    saved = _load_dir(ema_dir)
    for name, e in zip(full.ema.names, full.ema.shadow):
        assert torch.equal(saved[name], e), name
    for name, t in _load_dir(tmp_path / "cut" / EMA_DIR).items():
        assert torch.equal(t, saved[name]), name


def test_resume_without_ema_state_is_an_error(tmp_path) -> None:
    from transformers import TrainerCallback

    _train(_tiny_llama(), tmp_path / "run", TrainerCallback(), max_steps=2)
    with pytest.raises(CheckpointError, match="the checkpoint has no EMA state"):
        _train(_tiny_llama(), tmp_path / "run", EMACallback(), max_steps=4, resume=str(tmp_path / "run" / "checkpoint-2"))


def test_online_equals_offline_over_checkpoints(tmp_path) -> None:
    """update_every == save_steps: online EMA == offline EMA over the checkpoints at the same beta."""
    beta = 0.8
    model = _tiny_llama()
    model.save_pretrained(tmp_path / "start")
    _train(model, tmp_path / "run", EMACallback(beta=beta, update_every=2), lr=5e-2)
    ema = _load_dir(tmp_path / "start")
    ema = {k: v.double() for k, v in ema.items()}
    for step in (2, 4, 6):
        ckpt = tmp_path / "run" / f"checkpoint-{step}"
        ema = {k: beta * v + (1 - beta) * load_file(ckpt / "model.safetensors")[k].double() for k, v in ema.items()}
        online = _load_dir(ckpt / EMA_DIR)  # the intermediate EMA matches the partial offline EMA too
        for name, t in online.items():
            assert_close(t, ema[name], what=f"step {step} {name}", **TRAIN_TOL)
    final = _load_dir(tmp_path / "run" / EMA_DIR)
    moved = max((final[k].double() - _load_dir(tmp_path / "start")[k].double()).abs().max().item() for k in final)
    assert moved > 1e-3, "the run must move the weights for this test to mean anything"


def test_online_equals_mergekit_safe_ema_cli(tmp_path) -> None:
    """The same agreement through ``mergekit-safe ema`` (the lead's CLI); skips until it lands."""
    cli = pytest.importorskip("mergekit_safe.cli")
    from click.testing import CliRunner

    beta = 0.8
    model = _tiny_llama()
    model.save_pretrained(tmp_path / "start")
    _train(model, tmp_path / "run", EMACallback(beta=beta, update_every=2), lr=5e-2)
    ckpts = [str(tmp_path / "run" / f"checkpoint-{s}") for s in (2, 4, 6)]
    out = tmp_path / "offline"
    args = ["ema", *ckpts, "--beta", str(beta), "--start", str(tmp_path / "start"), "-o", str(out)]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 0, result.output
    offline, online = _load_dir(out), _load_dir(tmp_path / "run" / EMA_DIR)
    assert sorted(offline) == sorted(online)
    for name in online:
        assert_close(online[name], offline[name], what=name, **TRAIN_TOL)


def test_ema_coefficients_match_online_weights() -> None:
    """``methods.ema_coefficients`` (the lead's) weights c_0..c_T as the online recursion does."""
    methods = pytest.importorskip("mergekit_safe.merge.methods")
    if not hasattr(methods, "ema_coefficients"):
        pytest.skip("mergekit_safe.merge.methods.ema_coefficients has not landed yet")
    beta, p = 0.8, torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    ema = ParameterEMA([("p", p)], beta=beta)
    for t in range(3):  # online with one-hot inputs reads off the weight of each checkpoint
        p.data.zero_()
        p.data[t + 1] = 1.0
        ema.update()
    weights = ema.shadow[0].double().tolist()
    weights[0] = beta**3  # the start's weight (its one-hot was never fed)
    got = methods.ema_coefficients(3, beta, with_start=True)  # 3 checkpoints after the start
    assert got == pytest.approx(weights, abs=1e-7)


def _lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))


def test_peft_tracks_only_adapter_and_saves_ema_adapter(tmp_path) -> None:
    from peft import PeftModel

    model = _lora(_tiny_llama())
    ema = ParameterEMA(model, beta=0.6)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert ema.names == trainable and all("lora_" in n for n in trainable) and len(trainable) == 8
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    ids = _Tokens().ids[:4]
    ref = _trainable64(model)
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update()
        ref = {k: 0.6 * ref[k] + 0.4 * v for k, v in _trainable64(model).items()}
    _check_shadow(ema, ref, FP32_TOL)

    ema.save_pretrained(tmp_path / "ema")
    adapter = load_file(tmp_path / "ema" / "adapter_model.safetensors")
    assert len(adapter) == len(ema.names)
    by_saved_name = {n.replace(".default", ""): e for n, e in zip(ema.names, ema.shadow)}
    for name, t in adapter.items():
        assert torch.equal(t, by_saved_name[name]), name

    # Merge as documented: W0 + scale * EMA(B) @ EMA(A).
    merged = PeftModel.from_pretrained(_tiny_llama(), tmp_path / "ema").merge_and_unload()
    w0 = _tiny_llama().model.layers[0].self_attn.q_proj.weight
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    a, b = (dict(zip(ema.names, ema.shadow))[f"{prefix}.lora_{x}.default.weight"] for x in "AB")
    assert_close(merged.model.layers[0].self_attn.q_proj.weight, w0 + (8 / 4) * b @ a, what="merged q_proj", **FP32_TOL)


def test_peft_trainer_resume(tmp_path) -> None:
    full = EMACallback(beta=0.7)
    _train(_lora(_tiny_llama()), tmp_path / "full", full, max_steps=4, lr=5e-2)
    assert (tmp_path / "full" / "checkpoint-2" / EMA_DIR / "adapter_model.safetensors").is_file()

    _train(_lora(_tiny_llama()), tmp_path / "cut", EMACallback(beta=0.7), max_steps=4, stop_at=2, lr=5e-2)
    resumed = EMACallback(beta=0.7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = _train(
            _lora(_tiny_llama()), tmp_path / "cut", resumed, max_steps=4, lr=5e-2,
            resume=str(tmp_path / "cut" / "checkpoint-2"),
        )  # fmt: skip
    # Trainer loads checkpoint-2/ema as an extra adapter on resume; the callback removes it again.
    assert list(trainer.model.peft_config) == ["default"]
    assert resumed.ema.names == full.ema.names
    for name, a, b in zip(full.ema.names, full.ema.shadow, resumed.ema.shadow):
        assert_close(b, a, what=name, atol=0, rtol=0)
    saved = load_file(tmp_path / "cut" / EMA_DIR / "adapter_model.safetensors")
    assert sorted(saved) == sorted(load_file(tmp_path / "full" / EMA_DIR / "adapter_model.safetensors"))
