"""Every reliance of the CPU backend's vLLM lane on a private vLLM 0.24.0 name, in one place.

Loaded in every vLLM process through vLLM's `vllm.general_plugins` entry point (`selfemo_cpu` in pyproject.toml),
which vLLM calls in its engine and worker processes, where verl's trainer cannot reach. It acts only under
VERL_PLATFORM=cpu; a GPU run loads this module (vLLM loads every general plugin) and it returns at once.
tests/vllm_lane/test_vllm_private_on_cpu.py has one contract test per item.
"""

from __future__ import annotations

import functools

from selfemo_verl.cpu import cpu_platform_selected


def keep_unpacked_cpu_weights() -> None:
    """Make vLLM's CPU linear layers keep their weight Parameter after packing it for oneDNN (idempotent).

    Relies on vLLM 0.24.0 private `vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm(layer,
    remove_weight)`, which `UnquantizedLinearMethod.process_weights_after_loading` imports at call time and calls
    with remove_weight=True: the layer then computes from a packed copy and its `weight` becomes an empty tensor.
    verl's weight sync loads new tensors into `weight` ("Attempted to load weight ... into parameter
    torch.Size([0])") and its sender then waits forever. With the weight kept, verl's `update_weights_from_ipc`
    loads into it and calls `process_weights_after_loading` again, which packs the new values. Costs one unpacked
    copy of the linear weights in host memory.
    """
    from vllm.model_executor.layers import utils

    original = utils.dispatch_cpu_unquantized_gemm
    if getattr(original, "_selfemo_keep_weight", False):
        return

    @functools.wraps(original)
    def dispatch_cpu_unquantized_gemm(layer, remove_weight: bool) -> None:
        return original(layer, remove_weight=False)

    dispatch_cpu_unquantized_gemm._selfemo_keep_weight = True
    utils.dispatch_cpu_unquantized_gemm = dispatch_cpu_unquantized_gemm


def vllm_plugin() -> None:
    """vLLM general plugin: under VERL_PLATFORM=cpu, keep the weights verl's weight sync writes into."""
    if cpu_platform_selected():
        keep_unpacked_cpu_weights()
