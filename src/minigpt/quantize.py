"""Post-training int8 quantization of a GPT's Linear layers, and what it buys (chapter 9).

Dynamic quantization (Jacob et al. 2018 for integer inference; the "dynamic" variant quantizes
activations on the fly) stores each Linear weight as int8 with a float scale, and at run time
quantizes each input to int8 too, multiplies integers (int32 accumulation) and rescales. The
weights shrink 4x; whether it is faster depends on the matrix sizes and the CPU.

Two implementations:

- ``Int8Linear``: from scratch, symmetric ("absmax") int8 with one scale per output channel
  for the weight and one per row (token) for the input, like LLM.int8()'s vector-wise
  quantization without its outlier decomposition (Dettmers et al. 2022);
- ``method="torch"``: PyTorch's ``torch.ao.quantization.quantize_dynamic`` (fbgemm/onednn
  kernels; per-tensor weight scale, asymmetric uint8 activations). PyTorch has deprecated
  ``torch.ao.quantization`` in favour of the separate ``torchao`` package; it still works in
  torch 2.13, so ``quantize_model`` silences its deprecation warnings and raises a clear
  error, pointing to ``method="scratch"``, once it is gone.

Weight tying: ``GPT.lm_head.weight`` *is* ``transformer.wte.weight``. Quantizing ``lm_head``
replaces it by an int8 copy, while the embedding lookup keeps the float table: the tie is
broken and the file holds both. ``quantize_model`` therefore leaves ``lm_head`` in float
unless ``include_lm_head=True``.
"""

from __future__ import annotations

import copy
import io
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from minigpt.generate import generate

QMAX = 127  # symmetric int8: values in [-127, 127] (-128 unused, so the grid is symmetric)
METHODS = ("torch", "scratch")


def quantize_absmax(x: Tensor, dim: int = -1) -> tuple[Tensor, Tensor]:
    """Symmetric int8 quantization along ``dim``: ``(q, scale)`` with x ~ q * scale.

    ``scale = max|x| / 127`` over ``dim`` (kept as a size-1 dimension),
    ``q = round(x / scale)``.
    All-zero slices get scale 1 (and q = 0). The rounding error is at most scale / 2.
    """
    if not x.is_floating_point():
        raise ValueError(
            f"quantize_absmax needs a floating-point tensor, got {x.dtype}"
        )
    amax = x.detach().abs().amax(dim=dim, keepdim=True).float()
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    q = torch.round(x.float() / scale).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize(q: Tensor, scale: Tensor) -> Tensor:
    """The float values ``q * scale`` the int8 codes stand for."""
    return q.float() * scale


class Int8Linear(nn.Module):
    """A Linear layer with int8 weights and dynamically int8-quantized inputs (from scratch).

    y = (q_x @ q_W^T) * s_x * s_W + b, with the integer product accumulated in int32 by
    ``torch._int_mm``; s_W has one scale per output feature, s_x one per input row.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_t", torch.zeros(in_features, out_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(1, out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear) -> Int8Linear:
        """Quantize a trained ``nn.Linear`` (its weight rows, i.e. output channels)."""
        out = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        q, scale = quantize_absmax(linear.weight.detach(), dim=1)  # (out, in), (out, 1)
        out.weight_t.copy_(q.t())
        out.scale.copy_(scale.t())
        if linear.bias is not None:
            out.bias.copy_(linear.bias.detach())
        return out

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        qx, sx = quantize_absmax(x2, dim=1)  # (M, in) int8, (M, 1)
        acc = torch._int_mm(qx, self.weight_t)  # (M, out) int32, exact
        y = acc.float() * sx * self.scale
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, dtype=int8")


def _linear_names(model: nn.Module, include_lm_head: bool) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)
            and (include_lm_head or name != "lm_head")]


def _torch_quantize_dynamic(model: nn.Module, names: list[str]) -> nn.Module:
    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError as e:
        raise ValueError(f"this PyTorch has no torch.ao.quantization.quantize_dynamic ({e}); "
                         "use quantize_model(..., method='scratch')") from None
    with warnings.catch_warnings():  # deprecated in favour of torchao, but still working
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
        return quantize_dynamic(model, set(names), dtype=torch.qint8)


def quantize_model(
    model: nn.Module, method: str = "torch", *, include_lm_head: bool = False
) -> nn.Module:
    """An int8 copy of ``model`` (eval mode) with its Linear layers dynamically quantized.

    ``method``: "torch" (``torch.ao.quantization.quantize_dynamic``) or "scratch"
    (``Int8Linear``). The output layer ``lm_head`` stays float unless ``include_lm_head``
    (it is tied to the token embedding; see the module docstring). ``model`` is not changed.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    names = _linear_names(model, include_lm_head)
    if not names:
        raise ValueError("the model has no nn.Linear layers to quantize")
    qmodel = copy.deepcopy(model).eval()
    if method == "torch":
        return _torch_quantize_dynamic(qmodel, names)
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = qmodel.get_submodule(parent) if parent else qmodel
        setattr(owner, child, Int8Linear.from_float(getattr(owner, child)))
    return qmodel


def state_dict_bytes(model: nn.Module) -> int:
    """Size of ``torch.save(model.state_dict())`` in bytes (shared tensors are stored once)."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


@torch.inference_mode()
def decode_speed(
    model: nn.Module,
    batch_size: int = 1,
    new_tokens: int = 32,
    prompt_len: int = 8,
    repeats: int = 3,
    seed: int = 0,
    clock: Callable[[], float] = time.perf_counter,
) -> dict:
    """Greedy KV-cache decoding speed: ``batch_size`` random prompts, ``new_tokens`` each.

    Returns the median of ``repeats`` timings as ``tokens_per_s`` (all rows: throughput) and
    ``ms_per_token`` (wall time per decoding step: the latency one user sees per token),
    with the spread of the repeats as ``ms_per_token_min`` and ``ms_per_token_max``.
    The prompts' prefill is included; keep ``prompt_len`` small against ``new_tokens``.
    ``clock`` reads the time in seconds. Every model decodes through its modules
    (``engine=False``): int8 layers have no engine path, and comparing a float model on the
    engine with an int8 one on the modules would mix two effects.
    """
    cfg = model.config
    if min(batch_size, new_tokens, prompt_len, repeats) < 1:
        raise ValueError("batch_size, new_tokens, prompt_len and repeats must be >= 1")
    if prompt_len + new_tokens > cfg.block_size:
        raise ValueError(f"prompt_len + new_tokens = {prompt_len + new_tokens} exceeds "
                         f"block_size={cfg.block_size}; decode fewer tokens")
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(cfg.vocab_size, (batch_size, prompt_len), generator=gen)
    generate(model, prompts, 2, temperature=0.0, engine=False)  # warm-up (kernels, allocator)
    times = []
    for _ in range(repeats):
        start = clock()
        generate(model, prompts, new_tokens, temperature=0.0, use_cache=True, engine=False)
        times.append(clock() - start)
    mid = statistics.median(times)
    return {"batch_size": batch_size, "repeats": repeats,
            "tokens_per_s": batch_size * new_tokens / mid,
            "ms_per_token": 1000 * mid / new_tokens,
            "ms_per_token_min": 1000 * min(times) / new_tokens,
            "ms_per_token_max": 1000 * max(times) / new_tokens}


__all__ = ["Int8Linear", "METHODS", "decode_speed", "dequantize", "quantize_absmax",
           "quantize_model", "state_dict_bytes"]
