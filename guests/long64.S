/*
 * long64.S - minivmm's default guest, for the direct ELF64 long-mode boot.
 *
 * Entered at CPL0 in 64-bit mode with paging on (identity map, User pages),
 * RBX = multiboot information.  CPL0 is emulated on PVM (slow), so it only
 * checks two command-line words, reads CPUID (CPL0 is where the VMM's
 * table is seen: on some hosts CPUID at CPL3 is not intercepted and returns
 * the host's own leaves) and then drops to CPL3 with IOPL=3 (see user64.S),
 * where everything else runs natively.
 *
 * Run:    python -m minivmm -kernel long64.elf -append "..."
 * Prints: long64: hello from 64-bit long mode
 *         long64: cpl=3 iopl=3
 *         long64: work=19ec7595d3969201   (200 million LCG steps)
 *         long64: mmio=ffffffff port=ff   (unassigned MMIO and port)
 *         long64: cpuid vendor=<12 chars>
 *         long64: cpuid 1 ecx=XXXXXXXX edx=XXXXXXXX
 *         long64: cmdline=<text>
 * Exits:  debug-exit value 0x10 (status 33), or power off (status 0).
 * Command line words:
 *         bench    CPL0 loop of "out %al, $PORT_POST" forever, nothing
 *                  printed (the port-I/O exit benchmark; CPL0 because PVM
 *                  takes a slow path for port I/O from CPL3)
 *         fault    triple fault at CPL0 (IDT limit 0, then ud2): SHUTDOWN
 *         badinsn  xgetbv at CPL0: not emulated on PVM, the VMM must
 *                  report an internal error
 */
#include "guest.h"

	.equ UNASSIGNED_MMIO, 0xd0000000	/* nothing is mapped here */
	.equ UNASSIGNED_PORT, 0x1234
	/* The work loop: x = x * LCG_A + LCG_C (mod 2^64), Knuth MMIX LCG.
	 * From x = 1, after 200 million steps x = 0x19ec7595d3969201. */
	.equ WORK_ITERATIONS, 200000000
	.equ LCG_A, 6364136223846793005
	.equ LCG_C, 1442695040888963407

	.code64
	.text
	.globl _start
_start:					/* CPL0: keep this short */
	mov $kstack_top, %rsp
	xor %esi, %esi
	testl $MBI_FLAG_CMDLINE, MBI_FLAGS(%rbx)
	jz 1f
	mov MBI_CMDLINE(%rbx), %esi
1:	mov %rsi, cmdline

	mov $word_fault, %edi
	call cmd_find
	test %rax, %rax
	jnz fault
	mov $word_badinsn, %edi
	call cmd_find
	test %rax, %rax
	jnz badinsn
	mov $word_bench, %edi
	call cmd_find
	test %rax, %rax
	jnz bench

	xor %eax, %eax			/* CPUID as the VMM set it (emulated at CPL0) */
	cpuid
	mov %ebx, vendor		/* vendor string: EBX, EDX, ECX */
	mov %edx, vendor + 4
	mov %ecx, vendor + 8
	mov $1, %eax			/* feature flags, as -cpu edits them */
	xor %ecx, %ecx
	cpuid
	mov %ecx, leaf1_ecx
	mov %edx, leaf1_edx

	mov $user_main, %edi
	mov $ustack_top, %esi
	jmp enter_user

/* "fault": with an empty IDT, #UD cannot be delivered, nor can the #GP
 * that follows, nor the double fault: the CPU shuts down (triple fault). */
fault:
	lidt null_idt
	ud2

/* "badinsn": xgetbv is one of the instructions PVM cannot emulate.  On a
 * CPU that runs it (or raises #UD, which triple-faults here too), say so. */
badinsn:
	lidt null_idt
	xor %ecx, %ecx
	xgetbv
	PRINT("long64: xgetbv returned\n")
	mov $0x11, %al
	out %al, $DEBUG_EXIT_PORT
1:	cli
	hlt
	jmp 1b

bench:					/* every iteration is one I/O exit */
	out %al, $PORT_POST
	jmp bench

/* ---- everything below runs at CPL3 ---- */
user_main:
	PRINT("long64: hello from 64-bit long mode\n")
	PRINT("long64: cpl=")
	xor %eax, %eax
	mov %cs, %ax			/* CPL = the RPL bits of CS */
	and $3, %eax
	call putdec
	PRINT(" iopl=")
	pushfq
	pop %rax
	shr $12, %eax			/* RFLAGS bits 12-13 */
	and $3, %eax
	call putdec
	PUTC('\n')

	mov $1, %eax			/* heavy work: fast only when native */
	movabs $LCG_A, %rbx
	movabs $LCG_C, %rdx
	mov $WORK_ITERATIONS, %ecx
1:	imul %rbx, %rax
	add %rdx, %rax
	dec %rcx
	jnz 1b
	PRINT("long64: work=")
	mov $16, %ecx
	call puthex
	PUTC('\n')

	mov $UNASSIGNED_MMIO, %ebx
	mov (%rbx), %ebx		/* 32-bit load: all ones expected */
	mov $UNASSIGNED_PORT, %dx
	in %dx, %al			/* 0xff expected */
	movzbl %al, %edx
	PRINT("long64: mmio=")
	mov %ebx, %eax
	mov $8, %ecx
	call puthex
	PRINT(" port=")
	mov %edx, %eax
	mov $2, %ecx
	call puthex
	PUTC('\n')

	PRINT("long64: cpuid vendor=")	/* read at CPL0, above */
	mov $vendor, %esi
	call puts
	PUTC('\n')
	PRINT("long64: cpuid 1 ecx=")
	mov leaf1_ecx, %eax
	mov $8, %ecx
	call puthex
	PRINT(" edx=")
	mov leaf1_edx, %eax
	call puthex
	PUTC('\n')

	PRINT("long64: cmdline=")
	mov cmdline, %rsi
	test %rsi, %rsi
	jz 1f
	call puts
1:	PUTC('\n')
	mov $0x10, %al
	jmp guest_exit

#include "user64.S"
#include "serial.S"
#include "cmdline.S"

	.section .rodata
word_bench:	.asciz "bench"
word_fault:	.asciz "fault"
word_badinsn:	.asciz "badinsn"
	.balign 8
null_idt:	.word 0			/* limit 0: no vector is valid */
		.quad 0

	.data
cmdline:	.quad 0
vendor:		.space 13		/* 12 characters and a NUL */
	.balign 4
leaf1_ecx:	.long 0
leaf1_edx:	.long 0

	.bss
	.balign 16
	.space 1024
kstack_top:
	.space 8192
ustack_top:
