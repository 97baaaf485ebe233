"""selfemo_verl.cpu.faults: the fault pattern of SELFEMO_HF_FAIL_FIRST_CALLS and its environment variables."""

import pytest

from selfemo_verl.cpu import faults as faults_mod


# ---------------- fault injection (SELFEMO_HF_FAIL_FIRST_CALLS) ----------------


def test_fault_pattern_fails_an_exact_share_of_new_ids_and_never_a_seen_one():
    for share, seed in ((0.25, 0), (0.25, 7), (0.1, 3), (1.0, 0)):
        faults = faults_mod.FirstCallFaults(share=share, seed=seed)
        fails = [faults.should_fail(f"r{i}") for i in range(100)]
        # reason: floor((n+1)s + phase) - floor(ns + phase) summed over n < N is floor(Ns + phase) - floor(phase)
        assert sum(fails) == faults.failed == round(100 * share)
        assert not any(faults.should_fail(f"r{i}") for i in range(100))  # a retry of a seen id goes through
    a, b = faults_mod.FirstCallFaults(0.3, seed=1), faults_mod.FirstCallFaults(0.3, seed=1)
    assert [a.should_fail(i) for i in range(50)] == [b.should_fail(i) for i in range(50)]  # deterministic


def test_faults_are_off_unless_the_env_sets_a_share_and_bad_values_raise():
    assert faults_mod.faults_from_env({}) is None
    assert faults_mod.faults_from_env({faults_mod.SHARE_ENV: ""}) is None
    assert faults_mod.faults_from_env({faults_mod.SHARE_ENV: "0"}) is None
    on = faults_mod.faults_from_env({faults_mod.SHARE_ENV: "0.25", faults_mod.SEED_ENV: "4"})
    assert (on.share, on.mode, on.seed) == (0.25, "raise", 4)
    for env in ({faults_mod.SHARE_ENV: "1.5"}, {faults_mod.SHARE_ENV: "lots"},
                {faults_mod.SHARE_ENV: "0.5", faults_mod.MODE_ENV: "explode"}):
        with pytest.raises(ValueError, match="SELFEMO_HF_FAIL"):
            faults_mod.faults_from_env(env)
