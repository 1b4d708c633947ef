"""The thin fd wrappers against real /dev/kvm: failures name the ioctl."""

import errno

import pytest

from minivmm.kvm import constants as c
from minivmm.kvm.system import Kvm, KvmError
from minivmm.memory import RamBlock


@pytest.fixture
def vm():
    kvm = Kvm()
    vm = kvm.create_vm()
    yield vm
    vm.close()
    kvm.close()


def test_failed_ioctl_raises_with_its_name(vm):
    block = RamBlock.memfd("t", 1 << 20, shared=True)
    try:
        with pytest.raises(KvmError) as e:
            vm.set_user_memory_region(0, 0x800, 0x1000, block.host_addr)  # gpa not page aligned
        assert e.value.errno == errno.EINVAL
        assert str(e.value) == "KVM_SET_USER_MEMORY_REGION failed: Invalid argument"
        vm.set_user_memory_region(0, 0, 1 << 20, block.host_addr)
    finally:
        block.close()


def test_vcpu_state_round_trips(vm):
    vm.create_irqchip()
    vcpu = vm.create_vcpu(0)
    try:
        regs = vcpu.get_regs()
        regs.rax, regs.rip = 0x1234_5678_9ABC_DEF0, 0xFFF0
        vcpu.set_regs(regs)
        assert (vcpu.get_regs().rax, vcpu.get_regs().rip) == (0x1234_5678_9ABC_DEF0, 0xFFF0)
        assert vcpu.get_mp_state() == c.KVM_MP_STATE_RUNNABLE
        with pytest.raises(KvmError, match="KVM_SET_MSRS failed: Invalid argument .MSR 0xdeadbeef"):
            vcpu.set_msrs({0xDEADBEEF: 1})
    finally:
        vcpu.close()


def test_capabilities_this_vmm_needs():
    kvm = Kvm()
    try:
        for cap in (c.KVM_CAP_IRQCHIP, c.KVM_CAP_PIT2, c.KVM_CAP_IMMEDIATE_EXIT, c.KVM_CAP_SET_IDENTITY_MAP_ADDR):
            assert kvm.check_extension(cap), cap
        assert kvm.vcpu_mmap_size() >= 4096
        assert any(e.function == 0x40000000 for e in kvm.supported_cpuid())  # KVM's own leaves
    finally:
        kvm.close()
