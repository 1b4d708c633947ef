/*
 * long32.S - from a 32-bit entry (protected mode, paging off, flat
 * segments: a PVH entry, a bzImage's startup_32) to 64-bit long mode at
 * CPL0, on static identity page tables: LONG32_GIB (default 4) GiB in 2 MiB
 * user pages, so that CPL3 code (user64.S) reaches RAM and the PCI and ECAM
 * windows below 4 GiB (and RAM above it, for a guest that maps more).
 *
 *   long_from_32   jump here in 32-bit code; it continues at long_entry
 *                  (the including guest's label) in 64-bit mode, with
 *                  user64.S's GDT loaded and no stack.
 *
 * The code goes in section LONG32_TEXT and the tables in LONG32_DATA
 * (defaults .text and .data): a guest that also boots in long mode can put
 * them in sections its long-mode image leaves out.  Emulated on PVM: a
 * few instructions only.
 */
#ifndef LONG32_TEXT
#define LONG32_TEXT .text
#endif
#ifndef LONG32_DATA
#define LONG32_DATA .data
#endif
#ifndef LONG32_GIB
#define LONG32_GIB 4
#endif

	.equ CR0_PE, 1
	.equ CR0_PG, 0x80000000
	.equ CR4_PAE, 0x20
	.equ MSR_EFER, 0xc0000080
	.equ EFER_LME, 0x100
	.equ PTE_USER, 0x7		/* present, writable, user */
	.equ PDE_USER_2M, 0x87		/* the same, 2 MiB page */

	.section LONG32_TEXT, "ax"
	.code32
long_from_32:
	lgdt gdt64_ptr			/* user64.S's GDT: 0x10 is 64-bit code */
	mov $boot_pml4, %eax
	mov %eax, %cr3
	mov %cr4, %eax
	or $CR4_PAE, %eax
	mov %eax, %cr4
	mov $MSR_EFER, %ecx
	rdmsr
	or $EFER_LME, %eax
	wrmsr
	mov %cr0, %eax
	or $(CR0_PG | CR0_PE), %eax
	mov %eax, %cr0
	ljmp $SEL_CODE64, $long_entry
	.code64

	.section LONG32_DATA, "aw"
	.balign 4096
boot_pml4:
	.quad boot_pdpt + PTE_USER
	.fill 511, 8, 0
boot_pdpt:				/* one page directory per GiB */
	.set pd, 0
	.rept LONG32_GIB
	.quad boot_pd + (pd << 12) + PTE_USER
	.set pd, pd + 1
	.endr
	.fill 512 - LONG32_GIB, 8, 0
boot_pd:
	.set pde, 0
	.rept 512 * LONG32_GIB
	.quad (pde << 21) | PDE_USER_2M
	.set pde, pde + 1
	.endr
	.text
