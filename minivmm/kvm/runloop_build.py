"""cffi's build script for the C run loop (runloop.c), in API mode: the C
compiler reads <linux/kvm.h>, so KVM_RUN and struct kvm_run come from the
kernel's headers, not from a copy. setup.py names it in ``cffi_modules``;
``pip install`` compiles it into minivmm.kvm._runloop."""

from pathlib import Path

from cffi import FFI

CDEF = """
struct kvm_run;
struct minivmm_latch { uint32_t last; uint64_t count; };
struct minivmm_loop {
    int fd;
    struct kvm_run *run;
    uint8_t hot;
    uint64_t hot_exits;
    ...;
};
int minivmm_run(struct minivmm_loop *loop);
int minivmm_add_latch(struct minivmm_loop *loop, uint16_t port, struct minivmm_latch *latch);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "minivmm.kvm._runloop",
    (Path(__file__).resolve().parent / "runloop.c").read_text(),
    extra_compile_args=["-O2", "-Wall"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
