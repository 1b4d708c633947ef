/*
 * acpi.S - walk and check the ACPI tables a guest is given (BITS = 64, CPL3
 * or CPL0), the way an OS finds them: the RSDP, then the XSDT (or the RSDT),
 * every table's checksum, the MADT's entries, the FADT's ports, and the
 * _S5 name in the DSDT.
 *
 *   acpi_walk    %rsi = the RSDP.  Fills the counters below (and acpi_facs,
 *                acpi_pm1a_evt, acpi_pm1a_cnt, acpi_pm_tmr, and the
 *                addresses of the DSDT, the MCFG and the DMAR, acpi_dsdt,
 *                acpi_mcfg and acpi_dmar, 0 when absent); clobbers %rax, %rcx, %rdx,
 *                %rsi, %r12-%r15.
 *   acpi_report  prints, each line starting with the string at acpi_prefix
 *                (the including guest defines it):
 *                  <prefix>: acpi rsdp=X rev=N tables=N bad-checksums=N
 *                  <prefix>: madt cpus=N ioapics=N overrides=N
 *                  <prefix>: fadt pm1a-evt=X pm1a-cnt=X pm-tmr=X dsdt-s5=yes|no
 */

	.text
acpi_walk:
	mov %rsi, acpi_rsdp
	mov $20, %ecx			/* the ACPI 1.0 part */
	call acpi_checksum
	test %al, %al
	jz 3f
	incl acpi_bad_sums
3:	movzbl 15(%rsi), %eax		/* revision */
	mov %eax, acpi_rsdp_rev
	cmp $2, %eax
	jb 4f
	mov 20(%rsi), %ecx		/* the whole 2.0 structure */
	call acpi_checksum
	test %al, %al
	jz 4f
	incl acpi_bad_sums
4:	mov 16(%rsi), %r12d		/* RSDT */
	mov 24(%rsi), %r13		/* XSDT (0 before revision 2) */
	test %r13, %r13
	jz 5f
	mov %r13, %rsi
	call acpi_check_table
	mov 4(%rsi), %r14d		/* walk the XSDT's 8-byte entries */
	lea 36(%rsi), %r15
	add %rsi, %r14
6:	cmp %r14, %r15
	jae 7f
	mov (%r15), %rsi
	call acpi_visit
	add $8, %r15
	jmp 6b
5:	mov %r12, %rsi			/* no XSDT: the RSDT's 4-byte entries */
	call acpi_check_table
	mov 4(%rsi), %r14d
	lea 36(%rsi), %r15
	add %rsi, %r14
8:	cmp %r14, %r15
	jae 7f
	mov (%r15), %esi
	call acpi_visit
	add $4, %r15
	jmp 8b
7:	test %r13, %r13			/* the RSDT is checked too when both exist */
	jz 9f
	mov %r12, %rsi
	call acpi_check_table
9:
	ret

acpi_report:
	push %rax
	push %rcx
	push %rsi
	mov $acpi_prefix, %esi
	call puts
	PRINT(": acpi rsdp=")
	mov acpi_rsdp, %rax
	mov $8, %ecx
	call puthex
	PRINT(" rev=")
	mov acpi_rsdp_rev, %eax
	call putdec
	PRINT(" tables=")
	mov acpi_tables, %eax
	call putdec
	PRINT(" bad-checksums=")
	mov acpi_bad_sums, %eax
	call putdec
	PUTC('\n')
	mov $acpi_prefix, %esi
	call puts
	PRINT(": madt cpus=")
	mov acpi_madt_cpus, %eax
	call putdec
	PRINT(" ioapics=")
	mov acpi_madt_ioapics, %eax
	call putdec
	PRINT(" overrides=")
	mov acpi_madt_overrides, %eax
	call putdec
	PUTC('\n')
	mov $acpi_prefix, %esi
	call puts
	PRINT(": fadt pm1a-evt=")
	mov acpi_pm1a_evt, %eax
	mov $4, %ecx
	call puthex
	PRINT(" pm1a-cnt=")
	mov acpi_pm1a_cnt, %eax
	call puthex
	PRINT(" pm-tmr=")
	mov acpi_pm_tmr, %eax
	call puthex
	PRINT(" dsdt-s5=")
	mov $acpi_word_no, %esi
	cmpl $0, acpi_dsdt_s5
	je 1f
	mov $acpi_word_yes, %esi
1:	call puts
	PUTC('\n')
	pop %rsi
	pop %rcx
	pop %rax
	ret

/* acpi_checksum: the byte sum of %ecx bytes at %rsi, in %al (0 when valid). */
acpi_checksum:
	push %rsi
	push %rcx
	push %rdx
	xor %eax, %eax
1:	test %ecx, %ecx
	jz 2f
	movzbl (%rsi), %edx
	add %dl, %al
	inc %rsi
	dec %ecx
	jmp 1b
2:	pop %rdx
	pop %rcx
	pop %rsi
	ret

/* acpi_check_table: %rsi = an ACPI table; counts it, and a bad checksum. */
acpi_check_table:
	push %rcx
	incl acpi_tables
	mov 4(%rsi), %ecx		/* header: length */
	call acpi_checksum
	test %al, %al
	jz 1f
	incl acpi_bad_sums
1:	pop %rcx
	ret

/* acpi_visit: %rsi = a table the RSDT/XSDT lists: check it; read the MADT and FADT. */
acpi_visit:
	push %rax
	push %rbx
	push %rcx
	push %rsi
	call acpi_check_table
	mov (%rsi), %eax
	cmp $0x43495041, %eax		/* "APIC" */
	je acpi_madt
	cmp $0x50434146, %eax		/* "FACP" */
	je acpi_fadt
	cmp $0x52414d44, %eax		/* "DMAR" */
	je acpi_dmar_found
	cmp $0x4746434d, %eax		/* "MCFG" */
	jne acpi_visit_done
	mov %rsi, acpi_mcfg
	jmp acpi_visit_done
acpi_dmar_found:
	mov %rsi, acpi_dmar
acpi_visit_done:
	pop %rsi
	pop %rcx
	pop %rbx
	pop %rax
	ret
acpi_madt:					/* entries after the 44-byte header: type, length, ... */
	mov 4(%rsi), %ecx
	add %rsi, %rcx			/* end */
	lea 44(%rsi), %rbx
1:	cmp %rcx, %rbx
	jae acpi_visit_done
	movzbl (%rbx), %eax
	cmp $0, %al			/* processor local APIC: flags bit 0 = enabled */
	jne 2f
	testl $1, 4(%rbx)
	jz 4f
	incl acpi_madt_cpus
	jmp 4f
2:	cmp $1, %al			/* I/O APIC */
	jne 3f
	incl acpi_madt_ioapics
	jmp 4f
3:	cmp $2, %al			/* interrupt source override */
	jne 4f
	incl acpi_madt_overrides
4:	movzbl 1(%rbx), %eax
	test %eax, %eax
	jz acpi_visit_done			/* a zero length would loop forever */
	add %rax, %rbx
	jmp 1b
acpi_fadt:
	mov 36(%rsi), %eax		/* FIRMWARE_CTRL: the FACS */
	mov %eax, acpi_facs
	mov 56(%rsi), %eax		/* PM1a_EVT_BLK */
	mov %eax, acpi_pm1a_evt
	mov 64(%rsi), %eax		/* PM1a_CNT_BLK */
	mov %eax, acpi_pm1a_cnt
	mov 76(%rsi), %eax		/* PM_TMR_BLK */
	mov %eax, acpi_pm_tmr
	mov 40(%rsi), %esi		/* DSDT: checked, and searched for the _S5_ name */
	test %esi, %esi
	jz acpi_visit_done
	mov %rsi, acpi_dsdt
	call acpi_check_table
	mov 4(%rsi), %ecx
	sub $4, %ecx
1:	cmpl $0x5f35535f, (%rsi)	/* "_S5_" */
	je 2f
	inc %rsi
	dec %ecx
	jnz 1b
	jmp acpi_visit_done
2:	movl $1, acpi_dsdt_s5
	jmp acpi_visit_done


	.data
	.balign 8
acpi_rsdp:		.quad 0
acpi_rsdp_rev:	.long 0
acpi_tables:		.long 0
acpi_bad_sums:	.long 0
acpi_madt_cpus:	.long 0
acpi_madt_ioapics:	.long 0
acpi_madt_overrides:	.long 0
acpi_pm1a_evt:	.long 0
acpi_pm1a_cnt:	.long 0
acpi_pm_tmr:		.long 0
acpi_dsdt_s5:	.long 0
acpi_facs:	.long 0
	.balign 8
acpi_dsdt:	.quad 0
acpi_mcfg:	.quad 0
acpi_dmar:	.quad 0
	.section .rodata
acpi_word_yes:	.asciz "yes"
acpi_word_no:	.asciz "no"
	.text
