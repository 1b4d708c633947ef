/*
 * user64.S - leave CPL0 as soon as possible (BITS = 64).
 *
 * On this project's machines CPL0 code is emulated instruction by
 * instruction (about 1000x slower), while 64-bit CPL3 code runs natively.
 * The ELF64 boot already gives us paging with an identity map whose pages
 * are all User, so CPL3 code can touch all of RAM.  What is missing is a
 * GDT with user segments: load ours, then "return" to CPL3 with iretq.
 * IF stays 0, so no interrupt ever needs an IDT or a stack switch.
 *
 * Port I/O at CPL3: RFLAGS.IOPL=3 allows it on a normal CPU, but the
 * paravirtual KVM (PVM) of our build machines does not carry IOPL into
 * user mode (pushfq there reads IOPL 0).  So we also load a TSS whose I/O
 * permission bitmap allows every port: the CPU (and PVM) consult it when
 * CPL > IOPL.  Either one alone is enough where it works.
 *
 *   enter_user  rdi = user entry point, rsi = user stack top.  No return.
 */

	.equ USER_DATA_SEL, 0x20 | 3	/* GDT index 4, RPL 3 */
	.equ USER_CODE_SEL, 0x28 | 3	/* GDT index 5, RPL 3 */
	.equ TSS_SEL, 0x30		/* GDT index 6 (a 16-byte descriptor) */
	.equ RFLAGS_IOPL3, 0x3002	/* IOPL=3, reserved bit 1, IF=0 */
	.equ TSS_IOMAP_BASE, 102	/* u16: offset of the I/O bitmap */
	.equ TSS_SIZE, 104		/* the 64-bit TSS proper */
	.equ IOMAP_SIZE, 65536 / 8	/* one bit per port, 0 = allowed */
	.equ TSS_LIMIT, TSS_SIZE + IOMAP_SIZE	/* + a final 0xff byte */

	.text
enter_user:
	mov $tss64, %eax		/* finish the TSS descriptor: base */
	mov %ax, gdt64_tss + 2		/* bits 15:0 */
	shr $16, %eax
	mov %al, gdt64_tss + 4		/* bits 23:16 */
	mov %ah, gdt64_tss + 7		/* bits 31:24 (63:32 stay 0) */
	movw $TSS_SIZE, tss64 + TSS_IOMAP_BASE	/* the rest of tss64 is 0: */
	movb $0xff, tss64 + TSS_LIMIT	/* every port allowed */
	lgdt gdt64_ptr
	mov $TSS_SEL, %ax
	ltr %ax
	mov $USER_DATA_SEL, %ax		/* data segments are not checked in */
	mov %ax, %ds			/* 64-bit mode, but keep them tidy */
	mov %ax, %es
	push $USER_DATA_SEL		/* SS */
	push %rsi			/* RSP */
	push $RFLAGS_IOPL3		/* RFLAGS */
	push $USER_CODE_SEL		/* CS */
	push %rdi			/* RIP */
	iretq

	.data
	.balign 8
gdt64:					/* accessed bits preset: no GDT writes */
	.quad 0				/* 0x00 null */
	.quad 0				/* 0x08 unused */
	.quad 0x00af9b000000ffff	/* 0x10 = SEL_CODE64: 64-bit code, DPL 0 */
	.quad 0x00cf93000000ffff	/* 0x18 = SEL_DATA: data, DPL 0 */
	.quad 0x00cff3000000ffff	/* 0x20: data, DPL 3 */
	.quad 0x00affb000000ffff	/* 0x28: 64-bit code, DPL 3 */
gdt64_tss:				/* 0x30: 64-bit TSS, present, DPL 0 */
	.word TSS_LIMIT, 0		/* limit 15:0, base 15:0 (set above) */
	.byte 0, 0x89, 0, 0		/* base 23:16, type 9, limit 19:16, base 31:24 */
	.long 0, 0			/* base 63:32, reserved */
gdt64_end:
	.balign 8
	.word 0, 0, 0			/* so that the base is 8-aligned */
gdt64_ptr:
	.word gdt64_end - gdt64 - 1
	.quad gdt64

	.bss
	.balign 16
tss64:	.space TSS_LIMIT + 1		/* zero-filled by the loader */
