/*
 * abwalk.S - the "A-B" memory walker of QEMU's migration (CPR) tests, for
 * minivmm's direct ELF64 long-mode boot, running at CPL3 (IOPL=3).
 *
 * Prints "A" once.  Sets the first byte of every 4 KiB page of every RAM
 * range of the multiboot memory map at or above 2 MiB to 0, then, forever,
 * increments those bytes in address order (one pass = every page once)
 * and prints "B" after every 64 passes (command line "every=N" changes 64).
 * After migration every walked page must hold the same byte, or one more
 * for the pages before "current".  Never exits.
 *
 * Built twice: abwalk.elf for minivmm's ELF64 boot, and abwalk-mb.elf
 * (MULTIBOOT_ENTRY, converted to ELF32) for any multiboot loader, QEMU's
 * -kernel included, so that minivmm and QEMU can be measured on the very
 * same guest (tools/bench_cpr.py).  Its 32-bit entry enters long mode on
 * long32.S's identity map of the first 8 GiB (RAM above 4 GiB included)
 * and joins the ELF64 entry.
 *
 * Status block at the fixed physical address 0x1ff000 (symbol "status",
 * see abwalk.ld), all little endian, plain stores:
 *   +0  u32 magic "ABWK" (0x4b574241), written last at start-up
 *   +4  u32 version 1
 *   +8  u64 passes completed
 *   +16 u64 address of the page being incremented
 *   +24 u64 number of ranges
 *   +32 ranges: (u64 start, u64 end), page aligned, end exclusive
 */
#include "guest.h"

	.equ WALK_START, 0x200000		/* 2 MiB */
	.equ WALK_PAGE, PAGE_SIZE
	.equ DEFAULT_EVERY, 64
	.equ ST_MAGIC, 0
	.equ ST_VERSION, 4
	.equ ST_PASSES, 8
	.equ ST_CURRENT, 16
	.equ ST_NRANGES, 24
	.equ ST_RANGES, 32
	.equ MAX_RANGES, (PAGE_SIZE - ST_RANGES) / 16
	.equ MMAP_TYPE_RAM, 1

#ifdef MULTIBOOT_ENTRY
	MULTIBOOT_HEADER
	.code32
	.text
	.globl _start
_start:					/* multiboot: paging off, ebx = information */
	jmp long_from_32		/* long32.S, mapping 8 GiB: on to long_entry */
#endif

	.code64
	.text
#ifndef MULTIBOOT_ENTRY
	.globl _start
_start:					/* ELF64 boot: in long mode already */
#else
long_entry:
#endif
start64:				/* CPL0: straight to CPL3 */
#ifdef MULTIBOOT_ENTRY
	mov $SEL_DATA, %ax		/* the loader's SS indexed its own GDT */
	mov %ax, %ss
#endif
	mov $kstack_top, %rsp
	mov %rbx, mbi
	mov $user_main, %edi
	mov $ustack_top, %esi
	jmp enter_user

/* ---- everything below runs at CPL3 ---- */
user_main:
	PUTC('A')

	mov mbi, %rbx			/* "every=N" */
	xor %esi, %esi
	testl $MBI_FLAG_CMDLINE, MBI_FLAGS(%rbx)
	jz 1f
	mov MBI_CMDLINE(%rbx), %esi
1:	mov $word_every, %edi
	call cmd_find
	mov $DEFAULT_EVERY, %r15d	/* r15 = passes per "B" */
	test %rax, %rax
	jz 1f
	mov %rax, %rsi
	call parse_dec
	test %rax, %rax
	jz 1f
	mov %rax, %r15
1:

/* Build the range list from the memory map: entries of (u32 size, u64
 * base, u64 length, u32 type); the size field does not count itself. */
	xor %r9d, %r9d			/* r9 = number of ranges */
	mov $status + ST_RANGES, %edi	/* rdi = next range slot */
	testl $MBI_FLAG_MMAP, MBI_FLAGS(%rbx)
	jz ranges_done
	mov MBI_MMAP_ADDR(%rbx), %esi
	mov MBI_MMAP_LENGTH(%rbx), %r8d
	add %rsi, %r8			/* r8 = end of the map */
	mov $WALK_START, %r10d
mmap_loop:
	cmp %r8, %rsi
	jae ranges_done
	cmpl $MMAP_TYPE_RAM, 20(%rsi)
	jne next_entry
	mov 4(%rsi), %rax		/* start = max(base, 2 MiB), page up */
	mov 12(%rsi), %rdx
	add %rax, %rdx			/* end = base + length, page down */
	cmp %r10, %rax
	cmovb %r10, %rax
	add $WALK_PAGE - 1, %rax
	and $-WALK_PAGE, %rax
	and $-WALK_PAGE, %rdx
	cmp %rdx, %rax
	jae next_entry			/* nothing left of this one */
	cmp $MAX_RANGES, %r9
	jae next_entry
	mov %rax, (%rdi)
	mov %rdx, 8(%rdi)
	add $16, %rdi
	inc %r9
next_entry:
	mov (%rsi), %eax
	lea 4(%rsi, %rax), %rsi
	jmp mmap_loop
ranges_done:
	test %r9, %r9
	jz no_ram

	mov %r9, status + ST_NRANGES	/* publish the status block */
	movq $0, status + ST_PASSES
	movq $0, status + ST_CURRENT
	movl $1, status + ST_VERSION
	movl $0x4b574241, status + ST_MAGIC	/* "ABWK", last */

	mov $status + ST_RANGES, %esi	/* first byte of every page = 0 */
	mov %r9, %rcx
1:	mov (%rsi), %rax
	mov 8(%rsi), %rdx
2:	movb $0, (%rax)
	add $WALK_PAGE, %rax
	cmp %rdx, %rax
	jb 2b
	add $16, %rsi
	dec %rcx
	jnz 1b

	mov %r15, %r14			/* r14 = passes until the next "B" */
walk:					/* one pass */
	mov $status + ST_RANGES, %esi
	mov %r9, %rcx
1:	mov (%rsi), %rax
	mov 8(%rsi), %rdx
2:	mov %rax, status + ST_CURRENT
	incb (%rax)
	add $WALK_PAGE, %rax
	cmp %rdx, %rax
	jb 2b
	add $16, %rsi
	dec %rcx
	jnz 1b
	incq status + ST_PASSES
	dec %r14
	jnz walk
	PUTC('B')
	mov %r15, %r14
	jmp walk

no_ram:
	PRINT("\nabwalk: no RAM above 2 MiB\n")
	mov $0x11, %al
	jmp guest_exit

#include "user64.S"
#ifdef MULTIBOOT_ENTRY
#define LONG32_GIB 8
#include "long32.S"
#endif
#include "serial.S"
#include "cmdline.S"

	.section .rodata
word_every:	.asciz "every="

	.data
mbi:		.quad 0

	.bss
	.balign 16
	.space 1024
kstack_top:
	.space 8192
ustack_top:

	.section .status, "aw", @nobits
	.globl status
status:
	.space PAGE_SIZE
