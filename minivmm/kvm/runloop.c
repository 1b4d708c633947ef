/* minivmm's vCPU run loop in C, built by cffi in API mode (runloop_build.py).
 *
 * The Python loop (VcpuThread._run in minivmm/vcpu.py) is the reference and
 * handles every exit that reaches it; this loop only saves the trip back to
 * Python for the exits whose device effect C can do exactly as the Python
 * device does. Today that is one kind: a port-I/O write to a "latch" port,
 * which stores the value and counts the write in registers the Python device
 * reads (the post-code port: devices/postcode.py). Every other exit, every
 * KVM_RUN error (EINTR and EAGAIN mean a pause) and every exit while Python
 * wants to see them all (hot == 0, or kvm_run.request_interrupt_window set)
 * returns to Python with kvm_run as KVM left it.
 */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>

#define MINIVMM_LATCHES 4

/* A latch port's registers, shared with Python (kvm/runloop.py: Latch). */
struct minivmm_latch {
    uint32_t last;  /* the last value written, cut to 4 bytes */
    uint64_t count; /* writes seen, wrapping at 2**64 */
};

struct minivmm_loop {
    int fd;               /* the vCPU fd */
    struct kvm_run *run;  /* its mmap'd kvm_run, set by Python for each run */
    volatile uint8_t hot; /* 0: return every exit to Python (work to do before each KVM_RUN) */
    uint8_t nlatches;
    uint16_t latch_port[MINIVMM_LATCHES];
    struct minivmm_latch *latch[MINIVMM_LATCHES];
    uint64_t hot_exits; /* exits handled here, added to VcpuThread.exits by Python */
};

static int latch_write(struct minivmm_loop *loop, const struct kvm_run *run)
{
    struct minivmm_latch *latch = NULL;
    const uint8_t *data;
    uint32_t i, size = run->io.size;

    if (run->exit_reason != KVM_EXIT_IO || run->io.direction != KVM_EXIT_IO_OUT)
        return 0;
    for (i = 0; i < loop->nlatches && !latch; i++)
        if (loop->latch_port[i] == run->io.port)
            latch = loop->latch[i];
    if (!latch || (size != 1 && size != 2 && size != 4))
        return 0;
    data = (const uint8_t *)run + run->io.data_offset;
    for (i = 0; i < run->io.count; i++, data += size) { /* a rep outs writes count values */
        uint32_t value = 0;
        memcpy(&value, data, size); /* x86: little-endian, as Python's int.from_bytes(..., "little") */
        __atomic_store_n(&latch->last, value, __ATOMIC_RELAXED);
        __atomic_fetch_add(&latch->count, 1, __ATOMIC_RELAXED); /* other vCPUs may write too */
    }
    return 1;
}

/* KVM_RUN until an exit for Python: 0, the exit is in kvm_run; -1, KVM_RUN failed (errno). */
int minivmm_run(struct minivmm_loop *loop)
{
    struct kvm_run *run = loop->run;

    for (;;) {
        if (ioctl(loop->fd, KVM_RUN, 0) < 0)
            return -1;
        if (!loop->hot || run->request_interrupt_window || !latch_write(loop, run))
            return 0;
        loop->hot_exits++;
    }
}

/* Handle OUTs to ``port`` here, storing into ``latch``; -1 when the table is full. */
int minivmm_add_latch(struct minivmm_loop *loop, uint16_t port, struct minivmm_latch *latch)
{
    if (loop->nlatches == MINIVMM_LATCHES)
        return -1;
    loop->latch_port[loop->nlatches] = port;
    loop->latch[loop->nlatches++] = latch;
    return 0;
}
