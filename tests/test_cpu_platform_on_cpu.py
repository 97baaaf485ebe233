"""selfemo_verl.cpu.cpu_platform and cpu.plugin: platform "cpu", selected only by VERL_PLATFORM=cpu.

Platform behaviour depends on process-wide state (verl's platform singleton, VERL_PLATFORM), so those facts are
gathered in fresh subprocesses, once per environment (fixtures `cpu_facts`, `default_facts` in conftest.py).
"""


# ---------------- platform "cpu" ----------------


def test_cpu_platform_answers_cpu_gloo_and_logical_gpu_when_selected(cpu_facts):
    assert (cpu_facts["device"], cpu_facts["backend"], cpu_facts["resource"]) == ("cpu", "gloo", "GPU")
    assert cpu_facts["device_id"] == "cpu"  # verl does .to(get_device_id()); an int would mean an accelerator
    assert cpu_facts["dev_name"] == "CPU" and cpu_facts["alloc"] == 0 and cpu_facts["avail"] is True
    free, total = cpu_facts["mem"]
    assert 0 < free <= total  # host memory, not a fake (0, 0)
    assert cpu_facts["rng"]  # the device RNG state is the CPU generator's


def test_plugin_changes_nothing_when_cpu_platform_not_selected(default_facts):
    # reason: GPU users import the plugin too; without VERL_PLATFORM=cpu verl's detection and torch stay as they were
    assert default_facts["device"] == "cuda" and default_facts["backend"] == "nccl"
    assert default_facts["wrapped"] is False and default_facts["wrapped_before"] is False


def test_plugin_import_installs_no_torch_patch_before_platform_is_used(cpu_facts):
    assert cpu_facts["wrapped_before"] is False and cpu_facts["wrapped"] is True
