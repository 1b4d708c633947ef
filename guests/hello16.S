/*
 * hello16.S - the smallest guest: a 64 KiB "BIOS" image in real mode.
 *
 * Run:    qemu-system-x86_64 -bios hello16.bin ...  or  minivmm -bios ...
 * Prints: hello16: hello from real mode
 *         hello16: cmos ext16m=XXXX    (CMOS 0x34/0x35: RAM above 16 MiB
 *                                       in 64 KiB units)
 * Exits:  debug-exit value 0x10 (status 33).
 *
 * The image is mapped so that it ends at 4 GiB and, aliased, at 1 MiB.
 * The CPU starts at the reset vector, CS base 0xffff0000, IP 0xfff0: that
 * is offset 0xfff0 of this image.  The far jump there reloads CS with
 * 0xf000 (base 0xf0000), where the alias below 1 MiB makes the same image
 * visible, so from then on offsets in this image are plain real-mode
 * offsets.  The linker script links it at address 0 for that reason.
 */
#include "guest.h"

	.equ ROM_SEG, 0xf000		/* segment of the alias below 1 MiB */
	.equ STACK_SEG, GUEST_FREE_LOW >> 4	/* a stack in free low RAM */
	.equ STACK_TOP, 0x1000
	.equ CMOS_EXT16M_LO, 0x34	/* RAM above 16 MiB, 64 KiB units */
	.equ CMOS_EXT16M_HI, 0x35

	.code16
	.text
	.globl start
start:
	cli
	mov $ROM_SEG, %ax		/* strings live in this image */
	mov %ax, %ds
	mov $STACK_SEG, %ax
	mov %ax, %ss
	mov $STACK_TOP, %sp

	PRINT("hello16: hello from real mode\n")

	mov $CMOS_EXT16M_HI, %al	/* read the high byte first ... */
	out %al, $PORT_CMOS
	in $PORT_CMOS + 1, %al
	mov %al, %ah
	mov $CMOS_EXT16M_LO, %al	/* ... then the low byte */
	out %al, $PORT_CMOS
	in $PORT_CMOS + 1, %al
	movzwl %ax, %eax
	PRINT("hello16: cmos ext16m=")
	mov $4, %ecx
	call puthex
	PUTC('\n')

	mov $0x10, %al
	jmp guest_exit

#include "serial.S"

/* The reset vector: the last 16 bytes of the image (see hello16.ld). */
	.section .reset, "ax"
	ljmp $ROM_SEG, $start
	.balign 16, 0xf4		/* pad with hlt */
