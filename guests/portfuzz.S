/*
 * portfuzz.S - a hostile guest: pseudo-random writes and reads to every
 * emulated port and to unassigned MMIO, then proof that the machine still
 * works (ELF64, minivmm's direct long-mode boot).
 *
 * Entered at CPL0 like long64; it keeps the command line and drops to CPL3
 * at once (see user64.S), where the fuzzing runs natively.  Each of OPS
 * steps draws from a xorshift64 generator seeded from the command line: a
 * port (three times in four from the table of the machine's devices below,
 * else any of the 65536), an access (8/16/32-bit out or in, or a 32-bit
 * MMIO write or read in an unassigned megabyte) and a value.  It leaves
 * alone only what a real guest would use to end itself on purpose: the
 * isa-debug-exit ports, the ACPI sleep-enable bit, the i8042's reset
 * commands (0xd1 and the 0xf0-0xff pulses), the reset control register's
 * reset bit (0xcf9 bit 2), pvpanic's "panicked" bit (it may say "crash loaded"), and the PIT, which KVM
 * emulates in the kernel and which, set to its shortest period, slows the
 * whole guest to a crawl under a nested host.  With "pit" on the command
 * line (for minivmm's own PIT, kernel-irqchip=split, whose period has a
 * floor) one device-port draw in four goes to the PIT's ports 0x40-0x43 and
 * 0x61 instead; with "ioapic", half the MMIO draws go to the IOAPIC's
 * registers, every value written with the redirection entry's mask bit
 * (16) set, so no random vector, NMI or INIT is ever delivered; with
 * "iommu" (q35 with -device intel-iommu), half the MMIO draws go to the VT-d
 * unit's register page, every value with bit 31 set (FECTL's and IECTL's
 * interrupt mask, so no fault or completion event becomes an MSI).  Nor does it touch ports
 * 0xfffd-0xffff: a wide access there runs past the end of the TSS I/O
 * bitmap (#GP, and with no IDT a triple fault and a reset that replays the
 * same seed forever; under PVM the bitmap, not IOPL, decides at CPL3).  Interrupts stay disabled,
 * so whatever the PIC and UARTs are programmed to do cannot fire.
 *
 * Then it puts COM1 back into a usable mode, checks a CMOS RAM byte can be
 * written and read back, and reports.
 *
 * Run:    minivmm -kernel portfuzz.elf -append "seed=1f ops=20000" -serial file:log
 *              -device isa-debug-exit,iobase=0xf4,iosize=0x4
 * Prints: portfuzz: seed=<16 hex digits> ops=<decimal> cmos=ok
 *         portfuzz: alive
 * Exits:  debug-exit value 0x10 (status 33); cmos=bad gives 0x11 (status 35).
 */
#include "guest.h"

	.equ UNASSIGNED_MMIO, 0xd0000000	/* nothing is mapped here */
	.equ DEFAULT_OPS, 20000
	.equ OP_MMIO, 6			/* access kinds 0-2 out, 3-5 in, 6-7 MMIO */
	.equ CMOS_RAM_PROBE, 0x40	/* a CMOS RAM byte no clock register uses */
	.equ UART_LCR_8N1, 0x03
	.equ UART_MCR_DTR_RTS, 0x03
	.equ UART_FCR_RESET, 0x07
	.equ SLP_EN, 0x2000		/* PM1a control: sleep (power off) */
	.equ I8042_WRITE_OUTPORT, 0xd1
	.equ I8042_PULSE_FIRST, 0xf0
	.equ LAST_WIDE_PORT, 0xfffc	/* a 32-bit access here ends at 0xffff */
	.equ PORT_PVPANIC, 0x505	/* -device pvpanic */
	.equ PVPANIC_PANICKED, 0x01
	.equ RESET_CONTROL_RST_CPU, 0x04

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
	mov $user_main, %edi
	mov $ustack_top, %esi
	jmp enter_user

/* ---- everything below runs at CPL3 ---- */
user_main:
	mov $1, %r15			/* the generator's state: never 0 */
	mov cmdline, %rsi
	mov $word_seed, %edi
	call cmd_find
	test %rax, %rax
	jz 1f
	mov %rax, %rsi
	call parse_hex
	test %rax, %rax
	jz 1f
	mov %rax, %r15
1:	mov %r15, seed
	mov $DEFAULT_OPS, %r14
	mov cmdline, %rsi
	mov $word_ops, %edi
	call cmd_find
	test %rax, %rax
	jz 2f
	mov %rax, %rsi
	call parse_dec
	mov %rax, %r14
2:	mov cmdline, %rsi		/* optional targets */
	mov $word_pit, %edi
	call cmd_find
	test %rax, %rax
	setnz fuzz_pit
	mov cmdline, %rsi
	mov $word_ioapic, %edi
	call cmd_find
	test %rax, %rax
	setnz fuzz_ioapic
	mov cmdline, %rsi
	mov $word_iommu, %edi
	call cmd_find
	test %rax, %rax
	setnz fuzz_iommu
	xor %r13d, %r13d		/* steps done */
	test %r14, %r14
	jz report

step:
	call next
	mov %rax, %rbx			/* rbx: which port and access */
	call next
	mov %rax, %r12			/* r12: the value */
	test $3, %bl			/* a device port, three times in four */
	jz 1f
	mov %rbx, %rax
	shr $2, %rax
	xor %edx, %edx
	mov $NPORTS, %ecx
	div %rcx
	movzwl ports(,%rdx,2), %edx
	cmpb $0, fuzz_pit
	je 2f
	test $0x30000, %ebx		/* "pit": one draw in four */
	jnz 2f
	mov %rbx, %rax
	shr $20, %rax
	xor %edx, %edx
	mov $NPIT_PORTS, %ecx
	div %rcx
	movzwl pit_ports(,%rdx,2), %edx
	jmp 8f				/* the PIT check below is for the others */
1:	mov %rbx, %rdx			/* any port */
	shr $16, %rdx
	and $0xffff, %edx
	cmp $LAST_WIDE_PORT, %edx	/* none that runs past 0xffff */
	ja done
2:	lea -DEBUG_EXIT_PORT(%rdx), %eax	/* the exit device: not ours to fuzz */
	cmp $4, %eax
	jb done
	lea -PORT_PIT(%rdx), %eax	/* nor the in-kernel PIT */
	cmp $4, %eax
	jb done
8:	mov %rbx, %rcx
	shr $32, %rcx
	and $7, %ecx			/* ecx: the access kind */
	cmp $OP_MMIO, %ecx
	jae mmio
	mov %r12, %rax
	cmp $3, %ecx
	jae do_in
	cmp $PORT_I8042_CMD, %dx	/* no reset by the keyboard controller */
	jne 3f
	cmp $I8042_WRITE_OUTPORT, %al
	je 4f
	cmp $I8042_PULSE_FIRST, %al
	jb 3f
4:	mov $0x20, %al			/* read the command byte instead */
3:	cmp $PORT_ACPI_PM1A_CNT, %dx	/* no power off */
	jne 5f
	and $~SLP_EN, %eax
5:	cmp $PORT_ACPI_PM1A_CNT + 1, %dx
	jne 6f
	and $~(SLP_EN >> 8), %eax
6:	cmp $PORT_PVPANIC, %dx		/* no panic report */
	jne 9f
	and $~PVPANIC_PANICKED, %eax
9:	cmp $PORT_RESET_CONTROL, %dx	/* no reset through 0xcf9 */
	jne 7f
	and $~RESET_CONTROL_RST_CPU, %eax
7:	cmp $1, %ecx
	jb out8
	je out16
	out %eax, %dx
	jmp done
out8:	out %al, %dx
	jmp done
out16:	out %ax, %dx
	jmp done
do_in:	cmp $4, %ecx
	jb in8
	je in16
	in %dx, %eax
	jmp done
in8:	in %dx, %al
	jmp done
in16:	in %dx, %ax
	jmp done
mmio:	mov %r12, %rdi			/* a 4-aligned address in the unassigned megabyte */
	shr $40, %rdi
	cmpb $0, fuzz_iommu
	je 3f
	bt $38, %r12			/* "iommu": every other draw */
	jnc 3f
	and $0xffc, %edi		/* the VT-d unit's register page */
	or $IOMMU_ADDR, %edi
	or $1 << 31, %r12d		/* FECTL and IECTL stay masked: no fault or completion MSI */
	jmp 2f
3:	cmpb $0, fuzz_ioapic
	je 1f
	bt $39, %r12			/* "ioapic": every other draw */
	jnc 1f
	and $0x7c, %edi			/* IOREGSEL, IOWIN, EOI and around them */
	or $IOAPIC_ADDR, %edi
	or $1 << 16, %r12d		/* masked: nothing is delivered */
	jmp 2f
1:	and $0xffffc, %edi
	or $UNASSIGNED_MMIO, %edi		/* zero-extends into rdi */
2:	cmp $OP_MMIO, %ecx
	je 7f
	mov %r12d, (%rdi)
	jmp done
7:	mov (%rdi), %eax
done:	inc %r13
	cmp %r14, %r13
	jb step

report:					/* COM1 as the serial helpers expect it */
	mov $PORT_COM1 + 3, %dx
	mov $UART_LCR_8N1, %al		/* also clears DLAB */
	out %al, %dx
	mov $COM1_IER, %dx
	xor %eax, %eax
	out %al, %dx
	mov $COM1_MCR, %dx
	mov $UART_MCR_DTR_RTS, %al	/* not loopback */
	out %al, %dx
	mov $PORT_COM1 + 2, %dx
	mov $UART_FCR_RESET, %al
	out %al, %dx

	mov $CMOS_RAM_PROBE, %al	/* the CMOS still keeps what it is given */
	out %al, $PORT_CMOS
	mov $0x5a, %al
	out %al, $PORT_CMOS + 1
	mov $CMOS_RAM_PROBE, %al
	out %al, $PORT_CMOS
	in $PORT_CMOS + 1, %al
	mov %al, %bl

	PUTC('\n')			/* after whatever the fuzzing printed */
	PRINT("portfuzz: seed=")
	mov seed, %rax
	mov $16, %ecx
	call puthex
	PRINT(" ops=")
	mov %r13, %rax
	call putdec
	cmp $0x5a, %bl
	jne 8f
	PRINT(" cmos=ok\n")
	PRINT("portfuzz: alive\n")
	mov $0x10, %al
	jmp guest_exit
8:	PRINT(" cmos=bad\n")
	mov $0x11, %al
	jmp guest_exit

/* next: rax = the next xorshift64 value (state in r15). */
next:
	mov %r15, %rax
	shl $13, %rax
	xor %rax, %r15
	mov %r15, %rax
	shr $7, %rax
	xor %rax, %r15
	mov %r15, %rax
	shl $17, %rax
	xor %rax, %r15
	mov %r15, %rax
	ret

#include "user64.S"
#include "serial.S"
#include "cmdline.S"

	.section .rodata
word_seed:	.asciz "seed="
word_ops:	.asciz "ops="
word_pit:	.asciz "pit"
word_ioapic:	.asciz "ioapic"
word_iommu:	.asciz "iommu"
	.balign 2
ports:					/* every port the machine emulates */
	.word PORT_COM1, PORT_COM1 + 1, PORT_COM1 + 2, PORT_COM1 + 3
	.word PORT_COM1 + 4, PORT_COM1 + 5, PORT_COM1 + 6, PORT_COM1 + 7
	.word 0x2f8, 0x2f9, 0x2fa, 0x2fb, 0x2fc, 0x2fd, 0x2fe, 0x2ff	/* COM2 */
	.word 0x3e8, 0x3e9, 0x3ea, 0x3eb, 0x3ec, 0x3ed, 0x3ee, 0x3ef	/* COM3 */
	.word 0x2e8, 0x2e9, 0x2ea, 0x2eb, 0x2ec, 0x2ed, 0x2ee, 0x2ef	/* COM4 */
	.word PORT_I8042_DATA, PORT_I8042_DATA + 1, PORT_I8042_DATA + 2
	.word PORT_I8042_DATA + 3, PORT_I8042_CMD
	.word PORT_CMOS, PORT_CMOS + 1, PORT_POST
	.word PORT_ACPI_PM1A_CNT, PORT_ACPI_PM1A_CNT + 1
	.word PORT_PIC_MASTER, PORT_PIC_MASTER + 1, PORT_PIC_SLAVE, PORT_PIC_SLAVE + 1
	.word 0x4d0, 0x4d1		/* ELCR */
	.word PORT_PVPANIC
ports_end:
	.equ NPORTS, (ports_end - ports) / 2
pit_ports:				/* with "pit" */
	.word PORT_PIT, PORT_PIT + 1, PORT_PIT + 2, PORT_PIT + 3, PORT_SPEAKER
pit_ports_end:
	.equ NPIT_PORTS, (pit_ports_end - pit_ports) / 2

	.data
cmdline:	.quad 0
seed:		.quad 0
fuzz_pit:	.byte 0
fuzz_ioapic:	.byte 0
fuzz_iommu:	.byte 0

	.bss
	.balign 16
	.space 1024
kstack_top:
	.space 8192
ustack_top:
