/*
 * serial.S - polled COM1 output (and input) helpers shared by every guest.
 *
 * Assembled in the guest mode (BITS = 16, 32 or 64).  Every routine
 * preserves every register except the documented result.  At CPL3 they
 * need RFLAGS.IOPL=3 for in/out.
 *
 *   putc     print the byte in %al
 *   puts     print the NUL-terminated string at rSI
 *   puthex   print rAX as %ecx lowercase hex digits (the low ones)
 *   putdec   print rAX as an unsigned decimal number
 *   getc     wait for a received byte, return it in %al
 *   guest_exit  end the VM with debug-exit value %al (does not return)
 */

	.text

putc:
	push rDX
	push rAX
	mov $COM1_LSR, %dx
1:	in %dx, %al			/* wait until the transmitter is empty */
	test $LSR_THR_EMPTY, %al	/* (no UART at all reads 0xff: fine) */
	jz 1b
	pop rAX
	mov $COM1_DATA, %dx
	out %al, %dx
	pop rDX
	ret

puts:
	push rAX
	push rSI
1:	mov (rSI), %al
	test %al, %al
	jz 2f
	call putc
	inc rSI
	jmp 1b
2:	pop rSI
	pop rAX
	ret

puthex:
	push rAX
	push rCX
	push rDX
	mov rAX, rDX			/* rDX = the value */
	shl $2, %ecx			/* bit position above the first digit */
1:	sub $4, %ecx			/* next digit, most significant first */
	jb 3f				/* borrow: all digits printed */
	mov rDX, rAX
	shr %cl, rAX
	and $0xf, %al
	add $'0', %al
	cmp $'9', %al
	jbe 2f
	add $('a' - '9' - 1), %al	/* 10..15 -> a..f */
2:	call putc
	jmp 1b
3:	pop rDX
	pop rCX
	pop rAX
	ret

putdec:
	push rAX
	push rBX
	push rCX
	push rDX
	mov $10, %ebx
	xor %ecx, %ecx			/* number of digits pushed */
1:	xor %edx, %edx
	div rBX				/* rAX = rDX:rAX / 10, rDX = remainder */
	push rDX			/* digits come out least significant first */
	inc %ecx
	test rAX, rAX
	jnz 1b
2:	pop rAX
	add $'0', %al
	call putc
	dec %ecx
	jnz 2b
	pop rDX
	pop rCX
	pop rBX
	pop rAX
	ret

getc:
	push rDX
	mov $COM1_LSR, %dx
1:	in %dx, %al			/* wait for "data ready" */
	test $LSR_DATA_READY, %al
	jz 1b
	mov $COM1_DATA, %dx
	in %dx, %al
	pop rDX
	ret

guest_exit:
	out %al, $DEBUG_EXIT_PORT	/* isa-debug-exit: status (al << 1) | 1 */
	mov $PORT_ACPI_PM1A_CNT, %dx	/* still here: no debug-exit device, */
	mov $POWEROFF_VALUE, %ax	/* so power off (status 0) */
	out %ax, %dx
#if BITS == 64
1:	pause				/* our 64-bit guests exit from CPL3, */
	jmp 1b				/* where hlt is not allowed */
#else
1:	cli
	hlt
	jmp 1b
#endif
