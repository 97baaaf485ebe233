"""verl platform `cpu`: lets verl 0.9.1's device layer run on a machine without an accelerator.

Selected only by `VERL_PLATFORM=cpu` (verl's own override). Registering the class changes nothing else:
auto-detection asks `is_platform_available`, which is False unless that variable names this platform.

What it answers (verl asks the platform, never torch directly):
- device `cpu`, collective backend `gloo`, `current_device()` = torch.device("cpu") (verl writes
  `.to(get_device_id())`, and an int there would mean an accelerator);
- Ray resource `GPU`: verl's resource pools only count GPU/NPU, so a CPU run starts Ray with logical
  GPUs (`ray_init.num_gpus`, see `selfemo_verl.cpu.launch`);
- `device_module`: `torch.cpu` plus the cuda-style calls verl makes that torch.cpu lacks (memory
  statistics are 0: there is no device memory; RNG state is the CPU generator's).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Optional

import psutil
import torch
from verl.plugin.platform import PlatformBase, PlatformRegistry

from selfemo_verl.cpu import PLATFORM_NAME, cpu_platform_selected, verl_private


class CpuDeviceModule:
    """`torch.cpu` with the `torch.cuda`-style functions verl 0.9.1 calls on `get_torch_device()`."""

    def __getattr__(self, name: str) -> Any:  # Stream, Event, stream, current_stream, synchronize, ...
        return getattr(torch.cpu, name)

    @staticmethod
    def get_device_name(device=None) -> str:
        return "CPU"

    @staticmethod
    def empty_cache() -> None:
        """No device cache to release."""

    @staticmethod
    def ipc_collect() -> None:
        """No CUDA IPC handles to collect."""

    @staticmethod
    def set_per_process_memory_fraction(fraction: float, device=None) -> None:
        """No device memory to cap."""

    @staticmethod
    def reset_peak_memory_stats(device=None) -> None:
        """No device memory statistics."""

    @staticmethod
    def memory_allocated(device=None) -> int:
        return 0

    memory_reserved = max_memory_allocated = max_memory_reserved = memory_allocated

    @staticmethod
    def mem_get_info(device=None) -> tuple[int, int]:
        """(free, total) host memory in bytes: the memory a CPU run actually draws on."""
        vm = psutil.virtual_memory()
        return vm.available, vm.total

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    manual_seed_all = manual_seed

    @staticmethod
    def get_rng_state(device=None) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, device=None) -> None:
        torch.set_rng_state(state)


@PlatformRegistry.register(platform=PLATFORM_NAME)
class PlatformCPU(PlatformBase):
    """The CPU platform (verl instantiates every registered platform to probe it, so __init__ does nothing)."""

    def __init__(self) -> None:
        self._device_module = CpuDeviceModule()

    device_name = property(lambda self: "cpu")
    vendor_name = property(lambda self: "cpu")
    device_module = property(lambda self: self._device_module)

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        return cpu_platform_selected()

    def current_device(self) -> torch.device:
        return torch.device("cpu")

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        """One device: nothing to select."""

    def synchronize(self, device_index: Optional[int] = None) -> None:
        """CPU ops are synchronous."""

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        """The CPU allocator has no expandable segments."""

    def empty_cache(self) -> None:
        """No device cache."""

    def get_device_capability(self, device_index: int = 0) -> tuple[Optional[int], Optional[int]]:
        return None, None

    def communication_backend_name(self) -> str:
        """'gloo'. verl asks this only of the selected platform, to build its process-group backend string,
        so this is where that string is made valid on CPU (`verl_private.install_gloo_backend_fix`)."""
        verl_private.install_gloo_backend_fix()
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"  # Ray sets it for logical GPUs; nothing reads it on CPU

    @contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        """No device profiler."""

    def profiler_stop(self) -> None:
        """No device profiler."""

    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_noset_envvars(self) -> list[str]:
        return ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"]

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None
