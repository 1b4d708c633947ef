/* The keeper: the old image's vCPUs go on running while cpr-exec replaces the
 * VMM, built into the C run loop's module (runloop_build.py).
 *
 * exec ends every thread of the process, and a KVM VM answers only the
 * address space that made it. So a cpr-exec's new image used to find the
 * guest stopped from before the exec until it had imported and built
 * itself. Here the old image clones one task per vCPU with CLONE_VM (not a
 * thread: exec leaves it alone, and it keeps the old address space, and so
 * the old VM, alive). Each runs KVM_RUN on its vCPU while the new image
 * starts; the new image then stops them, has the exits they could not
 * handle finished, and has their state read out, all through the control
 * block below, which lives in a memfd both images map (cpr/keeper.py).
 *
 * A keeper task runs no Python and calls nothing but syscalls: it cannot
 * emulate a device. A write (an OUT, an MMIO write) goes into a log, after
 * the coalesced ring's writes before it, and the vCPU runs on; the new image
 * makes the logged writes on its devices first, in order. A port read the
 * old image answered in advance (a table at the start of data[]: a register
 * whose value cannot change while the VMM is away, such as an idle UART's line
 * status) is answered from there, until a logged write the answer names
 * spoils it. Any other exit to
 * the VMM waits there ("parked", its kvm_run copied out) until the new image
 * has done the access with its own devices and sent the result back;
 * KVM_RUN with immediate_exit then completes it, as KVM's API asks before
 * the state is read.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>
#include <linux/kvm.h>

#define MINIVMM_KEEPER_VCPUS 64
#define MINIVMM_KEEPER_OPS 1024
#define MINIVMM_KEEPER_READS 16
#define MINIVMM_KEEPER_STACK (64 * 1024)

/* vCPU status, written by its task */
enum { KEEPER_RUNNING = 1, KEEPER_PARKED = 2, KEEPER_STOPPED = 3, KEEPER_FAILED = 4, KEEPER_GONE = 5 };
/* commands, written by the new image */
enum { KEEPER_RUN = 0, KEEPER_STOP = 1, KEEPER_COMPLETE = 2, KEEPER_SAVE = 3, KEEPER_EXIT = 4 };

/* One ioctl (or copy) of a list the new image has run in the old address space. */
struct minivmm_keeper_op {
    int32_t fd;       /* -1: copy ``size`` bytes from address ``request`` instead */
    uint32_t offset;  /* its argument in data[] (input there, output left there); size 0: no argument */
    uint64_t request;
    uint32_t size;
    int32_t ret;      /* the ioctl's result, -errno on failure */
};

/* An IN the keeper answers itself: ``size`` bytes at ``port`` read ``value`` while ``live``; a logged
 * OUT to ``spoil_port`` with a bit of ``spoil_mask`` set ends that (the register may change then). */
struct minivmm_keeper_read {
    uint16_t port;
    uint8_t size;
    volatile uint8_t live;
    uint32_t value;
    uint16_t spoil_port;
    uint8_t spoil_mask;
    uint8_t pad;
};

struct minivmm_keeper_vcpu {
    int32_t fd;
    int32_t tid;
    uint64_t run;              /* its kvm_run's address in the old image */
    uint32_t run_size;
    uint32_t run_copy;         /* offset in data[] of a copy of kvm_run, made when parked */
    volatile uint32_t status;
    volatile uint32_t command;
    int32_t err;               /* KEEPER_FAILED: KVM_RUN's errno */
    uint32_t pad;
};

struct minivmm_keeper {
    uint32_t magic;
    uint32_t nvcpus;
    uint32_t nops;
    uint32_t data_size;
    int32_t vm_fd;
    uint32_t ring_size;
    uint64_t ring;        /* the coalesced-write ring's address in the old image, 0: none */
    uint32_t nkeep;
    int32_t keep[MINIVMM_KEEPER_VCPUS]; /* more fds the ops use (the irqfds' eventfds) */
    uint64_t run_until;   /* CLOCK_MONOTONIC ns: nobody took over by then, the vCPUs stop */
    uint64_t exit_after;  /* and by then, the tasks end (the old address space with them) */
    uint32_t log_at;      /* offset in data[] of the write log: struct kvm_coalesced_mmio entries */
    uint32_t log_cap;     /* entries it holds */
    volatile uint32_t log_used;
    volatile uint32_t log_lock;
    volatile int32_t saved;  /* KEEPER_SAVE: the ops done (task 0), -1 while not */
    uint32_t nreads;      /* answered reads: the first entries of data[] (this slot was padding before) */
    struct minivmm_keeper_vcpu vcpu[MINIVMM_KEEPER_VCPUS];
    struct minivmm_keeper_op op[MINIVMM_KEEPER_OPS];
    uint8_t data[];
};

static struct minivmm_keeper *keeper; /* shared by the tasks: one address space */

static void kick(int sig)
{
    uint32_t i;
    (void)sig;
    for (i = 0; i < keeper->nvcpus; i++) /* a stop is for all: leave KVM_RUN, or do not enter it */
        ((struct kvm_run *)(uintptr_t)keeper->vcpu[i].run)->immediate_exit = 1;
}

static uint64_t now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + ts.tv_nsec;
}

static void nap(void)
{
    struct timespec ts = {0, 50 * 1000};
    nanosleep(&ts, NULL);
}

static void run_ops(void)
{
    uint32_t i;
    for (i = 0; i < keeper->nops; i++) {
        struct minivmm_keeper_op *op = &keeper->op[i];
        void *arg = op->size ? keeper->data + op->offset : NULL;
        if (op->fd < 0) {
            memcpy(arg, (const void *)(uintptr_t)op->request, op->size);
            op->ret = 0;
        } else {
            int r = ioctl(op->fd, op->request, arg);
            op->ret = r < 0 ? -errno : r;
        }
    }
}

#ifndef SYS_close_range
#define SYS_close_range 436
#endif

/* A task holds copies of the image's fds (its own table, from the clone): all but the KVM ones go,
 * so nothing the new image or a peer waits on to close (sockets, pipes, files) is kept open here. */
static void keep_only_kvm_fds(void)
{
    int keep[2 * MINIVMM_KEEPER_VCPUS + 1], n = 0, i, j, lo = 0;
    for (i = 0; i < (int)keeper->nvcpus; i++)
        keep[n++] = keeper->vcpu[i].fd;
    for (i = 0; i < (int)keeper->nkeep && i < MINIVMM_KEEPER_VCPUS; i++)
        keep[n++] = keeper->keep[i];
    keep[n++] = keeper->vm_fd;
    for (i = 1; i < n; i++) /* sort, few entries */
        for (j = i; j > 0 && keep[j - 1] > keep[j]; j--) {
            int x = keep[j];
            keep[j] = keep[j - 1];
            keep[j - 1] = x;
        }
    for (i = 0; i < n; i++) {
        if (keep[i] < lo)
            continue; /* a duplicate */
        if (keep[i] > lo)
            syscall(SYS_close_range, lo, keep[i] - 1, 0);
        lo = keep[i] + 1;
    }
    syscall(SYS_close_range, lo, ~0U, 0);
}

#define RING_MAX ((4096 - sizeof(struct kvm_coalesced_mmio_ring)) / sizeof(struct kvm_coalesced_mmio))

/* The answered reads. They live in data[], not in the fields above, so that the block's fields keep
 * their places from one minivmm to the next: a new image takes over an older one's block. */
static struct minivmm_keeper_read *reads(void)
{
    return (struct minivmm_keeper_read *)keeper->data;
}

static int log_append(uint64_t addr, uint32_t len, uint32_t pio, const uint8_t *data)
{
    struct kvm_coalesced_mmio *e;
    uint32_t i;
    if (keeper->log_used == keeper->log_cap || len > sizeof e->data)
        return 0;
    for (i = 0; pio && i < keeper->nreads && i < MINIVMM_KEEPER_READS; i++)
        if (reads()[i].spoil_port == addr && data[0] & reads()[i].spoil_mask)
            reads()[i].live = 0;
    e = (struct kvm_coalesced_mmio *)(keeper->data + keeper->log_at) + keeper->log_used;
    e->phys_addr = addr;
    e->len = len;
    e->pio = pio;
    memcpy(e->data, data, len);
    keeper->log_used++;
    return 1;
}

/* A write the guest need not wait for (an OUT, an MMIO write) goes into the log, in order with the
 * coalesced ring's writes before it, and the vCPU runs on: the new image makes the writes on its
 * devices, in that order, before anything else; a read waits for them there. 1 when logged. */
static int log_write(const struct kvm_run *run)
{
    struct kvm_coalesced_mmio_ring *ring = (struct kvm_coalesced_mmio_ring *)(uintptr_t)keeper->ring;
    uint32_t i, n, room, ok = 1;

    if (run->exit_reason == KVM_EXIT_IO)
        n = run->io.direction == KVM_EXIT_IO_OUT ? run->io.count : 0;
    else if (run->exit_reason == KVM_EXIT_MMIO)
        n = run->mmio.is_write ? 1 : 0;
    else
        n = 0;
    if (!n)
        return 0;
    while (__atomic_exchange_n(&keeper->log_lock, 1, __ATOMIC_ACQUIRE))
        ;
    if (ring) /* older than this write: first */
        for (; ring->first != ring->last && ok; ring->first = (ring->first + 1) % RING_MAX)
            ok = log_append(ring->coalesced_mmio[ring->first].phys_addr, ring->coalesced_mmio[ring->first].len,
                            ring->coalesced_mmio[ring->first].pio, ring->coalesced_mmio[ring->first].data);
    room = keeper->log_cap - keeper->log_used;
    if (ok && room >= n) {
        if (run->exit_reason == KVM_EXIT_IO)
            for (i = 0; i < n; i++)
                log_append(run->io.port, run->io.size, 1,
                           (const uint8_t *)run + run->io.data_offset + i * run->io.size);
        else
            log_append(run->mmio.phys_addr, run->mmio.len, 0, run->mmio.data);
    } else {
        ok = 0;
    }
    __atomic_store_n(&keeper->log_lock, 0, __ATOMIC_RELEASE);
    return ok;
}

/* An IN answered in advance (reads()): its data put where KVM_RUN takes it. 1 when answered. */
static int answer_read(struct kvm_run *run)
{
    uint32_t i;
    if (run->exit_reason != KVM_EXIT_IO || run->io.direction != KVM_EXIT_IO_IN || run->io.count != 1)
        return 0;
    for (i = 0; i < keeper->nreads && i < MINIVMM_KEEPER_READS; i++) {
        struct minivmm_keeper_read *r = &reads()[i];
        if (r->port == run->io.port && r->size == run->io.size && r->live) {
            memcpy((uint8_t *)run + run->io.data_offset, &r->value, r->size);
            return 1;
        }
    }
    return 0;
}

static int task(void *arg)
{
    struct minivmm_keeper_vcpu *v = arg;
    struct kvm_run *run = (struct kvm_run *)(uintptr_t)v->run;
    struct sigaction sa;
    sigset_t only;
    int i;

    /* Its own signal handlers (not shared with the image): none of Python's, a kick on SIGUSR1. */
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_DFL;
    for (i = 1; i < NSIG; i++)
        sigaction(i, &sa, NULL);
    sa.sa_handler = kick;
    sigaction(SIGUSR1, &sa, NULL);
    sigaction(SIGALRM, &sa, NULL); /* once a second: a look at the clock (the deadlines) */
    sigfillset(&only);
    sigdelset(&only, SIGUSR1);
    sigdelset(&only, SIGALRM);
    sigprocmask(SIG_SETMASK, &only, NULL);
    struct itimerval second = {{1, 0}, {1, 0}};
    setitimer(ITIMER_REAL, &second, NULL); /* this task's own: it is a process of its own */
    prctl(PR_SET_NAME, "minivmm-keeper", 0, 0, 0);
    keep_only_kvm_fds();
    v->tid = syscall(SYS_gettid);
    v->status = KEEPER_RUNNING;

    while (v->command == KEEPER_RUN && now() < keeper->run_until) {
        if (ioctl(v->fd, KVM_RUN, 0) < 0) {
            if (errno == EINTR || errno == EAGAIN) {
                run->immediate_exit = 0; /* a kick for a stop is seen in command, checked next */
                continue;
            }
            v->err = errno;
            v->status = KEEPER_FAILED;
            break;
        }
        if (log_write(run) || answer_read(run))
            continue; /* KVM_RUN completes the access and goes on */
        /* An exit only the VMM can finish: hand it over and wait. */
        memcpy(keeper->data + v->run_copy, run, v->run_size);
        v->status = KEEPER_PARKED;
        while ((v->command == KEEPER_RUN || v->command == KEEPER_STOP) && now() < keeper->exit_after)
            nap();
        break;
    }
    if (v->status == KEEPER_RUNNING)
        v->status = KEEPER_STOPPED;
    for (;;) {
        uint32_t cmd = v->command;
        if (cmd == KEEPER_COMPLETE && v->status == KEEPER_PARKED) {
            /* The new image did the access; its result is in the copy. KVM finishes the instruction. */
            memcpy(run, keeper->data + v->run_copy, v->run_size);
            run->immediate_exit = 1;
            if (ioctl(v->fd, KVM_RUN, 0) < 0 && errno != EINTR) {
                v->err = errno;
                v->status = KEEPER_FAILED;
            } else {
                v->status = KEEPER_STOPPED;
            }
        } else if (cmd == KEEPER_SAVE && v == &keeper->vcpu[0] && keeper->saved < 0) {
            run_ops();
            __atomic_store_n(&keeper->saved, (int32_t)keeper->nops, __ATOMIC_RELEASE);
        } else if (cmd == KEEPER_EXIT || now() > keeper->exit_after) {
            v->status = KEEPER_GONE;
            syscall(SYS_exit, 0); /* this task only; the last one out takes the old address space along */
        }
        nap();
    }
    return 0;
}

/* In the old image: one task per vCPU, running it; their tids in vcpu[].tid once started.
 * 0, or -errno (the tasks made so far are told to stop). */
int minivmm_keeper_start(struct minivmm_keeper *k)
{
    uint32_t i;
    keeper = k;
    k->saved = -1;
    for (i = 0; i < k->nvcpus; i++) {
        char *stack = mmap(NULL, MINIVMM_KEEPER_STACK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (stack == MAP_FAILED)
            return -errno;
        k->vcpu[i].status = 0;
        if (clone(task, stack + MINIVMM_KEEPER_STACK, CLONE_VM | CLONE_FS | SIGCHLD, &k->vcpu[i]) < 0)
            return -errno;
    }
    return 0;
}
