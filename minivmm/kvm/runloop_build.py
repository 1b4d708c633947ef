"""cffi's build script for the C run loop (runloop.c) and the cpr-exec keeper
(keeper.c), in API mode: the C compiler reads <linux/kvm.h>, so KVM_RUN and
struct kvm_run come from the kernel's headers, not from a copy, and cffi
checks the keeper's control block below against keeper.c's. setup.py names
it in ``cffi_modules``; ``pip install`` compiles it into minivmm.kvm._runloop."""

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

#define MINIVMM_KEEPER_VCPUS 64
#define MINIVMM_KEEPER_OPS 1024
#define MINIVMM_KEEPER_READS 16
enum { KEEPER_RUNNING = 1, KEEPER_PARKED = 2, KEEPER_STOPPED = 3, KEEPER_FAILED = 4, KEEPER_GONE = 5 };
enum { KEEPER_RUN = 0, KEEPER_STOP = 1, KEEPER_COMPLETE = 2, KEEPER_SAVE = 3, KEEPER_EXIT = 4 };
struct minivmm_keeper_op { int32_t fd; uint32_t offset; uint64_t request; uint32_t size; int32_t ret; };
struct minivmm_keeper_read {
    uint16_t port; uint8_t size; volatile uint8_t live; uint32_t value; uint16_t spoil_port; uint8_t spoil_mask;
    uint8_t pad;
};
struct minivmm_keeper_vcpu {
    int32_t fd; int32_t tid; uint64_t run; uint32_t run_size; uint32_t run_copy;
    volatile uint32_t status; volatile uint32_t command; int32_t err; uint32_t pad;
};
struct minivmm_keeper {
    uint32_t magic; uint32_t nvcpus; uint32_t nops; uint32_t data_size;
    int32_t vm_fd; uint32_t ring_size; uint64_t ring; uint32_t nkeep; int32_t keep[64];
    uint64_t run_until; uint64_t exit_after;
    uint32_t log_at; uint32_t log_cap; volatile uint32_t log_used; volatile uint32_t log_lock;
    volatile int32_t saved; uint32_t nreads;
    struct minivmm_keeper_vcpu vcpu[64];
    struct minivmm_keeper_op op[1024];
    uint8_t data[];
};
int minivmm_keeper_start(struct minivmm_keeper *k);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "minivmm.kvm._runloop",
    "\n".join((Path(__file__).resolve().parent / name).read_text() for name in ("runloop.c", "keeper.c")),
    extra_compile_args=["-O2", "-Wall"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
