/*
 * smp.S - multiboot ELF32 guest that starts every other CPU.
 *
 * Finds the MP floating pointer ("_MP_") in the EBDA or the BIOS area,
 * counts the enabled processor entries of the MP configuration table,
 * copies a real-mode trampoline to TRAMPOLINE (a page below 1 MiB), and
 * sends INIT, SIPI, SIPI to all CPUs but itself through the local APIC.
 * Each AP runs the trampoline in real mode: it reads its APIC id with
 * CPUID leaf 1, marks its slot, counts itself with "lock incl" and halts.
 *
 * Run:    qemu-system-x86_64 -smp 4 -kernel smp.elf   (or minivmm -smp 4)
 * Prints: smp: mptable cpus=N
 *         smp: ap apic_id=X up      (one per AP, in APIC id order)
 *         smp: all N cpus up
 * Exits:  debug-exit value 0x10 (status 33); if the APs do not all show
 *         up, "smp: timeout, only M aps" and 0x11 (status 35).
 */
#include "guest.h"

	.equ TRAMPOLINE, GUEST_FREE_LOW	/* real-mode code for the APs */
	.equ BIOS_AREA, BIOS_ALIAS_END - 0x10000	/* 0xf0000 */
	.equ MP_FLOAT_SIG, 0x5f504d5f	/* "_MP_" */
	.equ MP_CONFIG_SIG, 0x504d4350	/* "PCMP" */
	.equ MPC_ENTRY_COUNT, 34	/* config table: u16 entry count */
	.equ MPC_ENTRIES, 44		/* config table: first entry */
	.equ MPC_CPU_SIZE, 20		/* entry type 0 (processor) */
	.equ MPC_OTHER_SIZE, 8		/* every other entry type */
	.equ LAPIC_SVR, LAPIC_ADDR + 0xf0
	.equ LAPIC_ICR_LO, LAPIC_ADDR + 0x300
	.equ LAPIC_ICR_HI, LAPIC_ADDR + 0x310
	.equ ICR_ALL_BUT_SELF, 3 << 18	/* destination shorthand */
	.equ ICR_ASSERT, 1 << 14
	.equ ICR_BUSY, 1 << 12		/* delivery status */
	.equ ICR_INIT, 5 << 8
	.equ ICR_STARTUP, 6 << 8
	.equ WAIT_SPINS, 3000000	/* each spin reads a port (an exit): seconds in all */

	MULTIBOOT_HEADER

	.code32
	.text
	.globl _start
_start:
	mov $stack_top, %esp
	cld

	mov $EBDA_ADDR, %esi		/* the MP floating pointer */
	mov $EBDA_ADDR + 1024, %edi
	call mp_scan
	test %eax, %eax
	jnz 1f
	mov $BIOS_AREA, %esi
	mov $BIOS_AREA + 0x10000, %edi
	call mp_scan
1:	mov $1, %ebp			/* ebp = CPUs (1 without an MP table) */
	test %eax, %eax
	jz no_table
	mov 4(%eax), %esi		/* the configuration table */
	test %esi, %esi
	jz no_table
	cmpl $MP_CONFIG_SIG, (%esi)
	jne no_table
	movzwl MPC_ENTRY_COUNT(%esi), %ecx
	add $MPC_ENTRIES, %esi
	xor %ebp, %ebp
	jecxz no_table
2:	cmpb $0, (%esi)			/* type 0: processor */
	jne 3f
	testb $1, 3(%esi)		/* flags bit 0: enabled */
	jz 4f
	inc %ebp
4:	add $MPC_CPU_SIZE, %esi
	loop 2b
	jmp 5f
3:	add $MPC_OTHER_SIZE, %esi
	loop 2b
5:	test %ebp, %ebp
	jnz 1f
no_table:
	mov $1, %ebp
1:	PRINT("smp: mptable cpus=")
	mov %ebp, %eax
	call putdec
	PUTC('\n')
	cmp $1, %ebp
	je all_up

	mov $tramp_start, %esi		/* the trampoline (and its zeroed */
	mov $TRAMPOLINE, %edi		/* counter and slots) */
	mov $tramp_end - tramp_start, %ecx
	rep movsb

	movl $0x1ff, LAPIC_SVR		/* APIC software enable */
	movl $0, LAPIC_ICR_HI
	mov $ICR_ALL_BUT_SELF | ICR_ASSERT | ICR_INIT, %eax
	call send_ipi
	mov $ICR_ALL_BUT_SELF | ICR_ASSERT | ICR_STARTUP | (TRAMPOLINE >> 12), %eax
	call send_ipi
	call send_ipi			/* the second SIPI, as the spec says */

	lea -1(%ebp), %ebx		/* wait for N-1 APs */
	mov $WAIT_SPINS, %ecx
1:	cmp %ebx, TRAMPOLINE + (tramp_count - tramp_start)
	jae aps_up
	in $PORT_POST, %al		/* pace the loop with an I/O exit */
	loop 1b
	PRINT("smp: timeout, only ")
	mov TRAMPOLINE + (tramp_count - tramp_start), %eax
	call putdec
	PRINT(" aps\n")
	mov $0x11, %al
	jmp guest_exit

aps_up:
	xor %ebx, %ebx			/* report the slots in APIC id order */
1:	cmpb $0, TRAMPOLINE + (tramp_slots - tramp_start)(%ebx)
	je 2f
	PRINT("smp: ap apic_id=")
	mov %ebx, %eax
	call putdec
	PRINT(" up\n")
2:	inc %ebx
	cmp $256, %ebx
	jb 1b
all_up:
	PRINT("smp: all ")
	mov %ebp, %eax
	call putdec
	PRINT(" cpus up\n")
	mov $0x10, %al
	jmp guest_exit

/* mp_scan: look for a valid MP floating pointer in [esi, edi) on 16-byte
 * boundaries.  Returns eax = its address, or 0. */
mp_scan:
	push %ecx
	push %edx
1:	cmp %edi, %esi
	jae 4f
	cmpl $MP_FLOAT_SIG, (%esi)
	jne 3f
	xor %eax, %eax			/* the 16 bytes must sum to 0 */
	xor %ecx, %ecx
2:	add (%esi, %ecx), %al
	inc %ecx
	cmp $16, %ecx
	jb 2b
	test %al, %al
	jnz 3f
	mov %esi, %eax
	jmp 5f
3:	add $16, %esi
	jmp 1b
4:	xor %eax, %eax
5:	pop %edx
	pop %ecx
	ret

/* send_ipi: write eax to the ICR, wait until it is delivered, then pause
 * a little (hardware wants 10 ms after INIT; KVM needs nothing).  Keeps
 * eax: the second SIPI reuses it, and a SIPI with vector 0 would win over
 * the first if the AP has not taken that one yet. */
send_ipi:
	push %eax
	push %ecx
	mov %eax, LAPIC_ICR_LO
1:	testl $ICR_BUSY, LAPIC_ICR_LO
	jnz 1b
	mov $200, %ecx
2:	in $PORT_POST, %al
	loop 2b
	pop %ecx
	pop %eax
	ret

#include "serial.S"

/* The AP trampoline, copied to TRAMPOLINE.  A SIPI with vector
 * TRAMPOLINE >> 12 starts the AP in real mode at CS = TRAMPOLINE >> 4,
 * IP = 0; with DS = CS, offsets from tramp_start address its data. */
	.code16
tramp_start:
	cli
	mov %cs, %ax
	mov %ax, %ds
	mov $1, %eax
	cpuid
	shr $24, %ebx			/* EBX[31:24] = initial APIC id */
	movb $1, (tramp_slots - tramp_start)(%bx)
	lock incl (tramp_count - tramp_start)	/* after the slot store */
1:	cli
	hlt
	jmp 1b
	.balign 4
tramp_count:	.long 0			/* APs up */
tramp_slots:	.fill 256, 1, 0		/* slot[apic id] = 1 when up */
tramp_end:
	.code32

	.bss
	.balign 16
	.space 4096
stack_top:
