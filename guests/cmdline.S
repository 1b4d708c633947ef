/*
 * cmdline.S - tiny command-line parsing helpers (BITS = 32 or 64).
 *
 *   cmd_find   rSI = command line (0: none), rDI = NUL-terminated key.
 *              Finds the key at the start of a space-separated word.  The
 *              whole word must match, unless the key ends in '=' (then it
 *              is a prefix: "exit=" matches "exit=2a").  Returns rAX =
 *              address just after the key in the command line, or 0.
 *   parse_dec  rSI = text.  Skips spaces, reads decimal digits.  Returns
 *              rAX = value (0 if there are no digits), rSI = after them.
 *   parse_hex  rSI = text.  Reads hex digits.  Returns rAX = value,
 *              rSI = after them.
 */

	.text

cmd_find:
	push rBX
	push rCX
	push rDX
	push rSI
	push rDI
	mov rDI, rDX			/* rDX = key */
	mov rSI, rBX			/* rBX = start of the current word */
	test rBX, rBX
	jz 8f
1:	mov (rBX), %al			/* skip spaces before a word */
	cmp $' ', %al
	jne 2f
	inc rBX
	jmp 1b
2:	test %al, %al			/* end of the command line */
	jz 8f
	mov rBX, rSI			/* compare the word with the key */
	mov rDX, rDI
3:	mov (rDI), %cl
	test %cl, %cl
	jz 4f				/* the whole key matched */
	cmp (rSI), %cl
	jne 5f
	inc rSI
	inc rDI
	jmp 3b
4:	cmpb $'=', -1(rDI)		/* "key=" is a prefix match */
	je 7f
	mov (rSI), %cl			/* otherwise the word must end here */
	test %cl, %cl
	jz 7f
	cmp $' ', %cl
	je 7f
5:	mov (rBX), %al			/* no match: skip to the end of the word */
	test %al, %al
	jz 8f
	cmp $' ', %al
	je 1b
	inc rBX
	jmp 5b
7:	mov rSI, rAX			/* found */
	jmp 9f
8:	xor %eax, %eax			/* not found (also clears a 64-bit rAX) */
9:	pop rDI
	pop rSI
	pop rDX
	pop rCX
	pop rBX
	ret

parse_dec:
	push rCX
	xor %eax, %eax
1:	cmpb $' ', (rSI)
	jne 2f
	inc rSI
	jmp 1b
2:	movzbl (rSI), %ecx
	sub $'0', %ecx
	cmp $9, %ecx
	ja 3f				/* not a digit */
	imul $10, rAX, rAX
	add rCX, rAX
	inc rSI
	jmp 2b
3:	pop rCX
	ret

parse_hex:
	push rCX
	xor %eax, %eax
1:	movzbl (rSI), %ecx
	sub $'0', %ecx
	cmp $9, %ecx
	jbe 2f				/* 0-9 */
	movzbl (rSI), %ecx
	or $0x20, %ecx			/* lower case */
	sub $'a', %ecx
	cmp $5, %ecx
	ja 3f				/* not a hex digit */
	add $10, %ecx			/* a-f */
2:	shl $4, rAX
	add rCX, rAX
	inc rSI
	jmp 1b
3:	pop rCX
	ret
