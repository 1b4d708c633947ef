/*
 * linuxboot.S - a boot-protocol conformance guest: what a Linux kernel is
 * handed, read back and printed.  One source, two images:
 *
 *   linuxboot.bin  a bzImage (linuxboot.ld): a real setup header (protocol
 *                  2.15, LOADED_HIGH, XLF_KERNEL_64, relocatable with
 *                  pref_address = its link address 0x200000) and a
 *                  protected-mode part with the 32-bit entry at +0 and
 *                  the 64-bit entry at +0x200, both given the zero page
 *                  in rSI.
 *   linuxpvh.elf   an ELF64 (linuxpvh.ld) with Xen's PHYS32_ENTRY note
 *                  pointing at pvh_start, given hvm_start_info in EBX.
 *
 * CPL0 is emulated on PVM (slow): the 64-bit entry only saves RSI and drops
 * to CPL3 (user64.S) on minivmm's user-accessible identity map.  The 32-bit
 * entries save their pointer and switch to long mode on long32.S's static
 * page tables (4 GiB in 2 MiB user pages), then do the same.
 *
 * Prints (each number in hex unless said):
 *   linuxboot: boot=bzimage|pvh entry=32|64 (decimal) load=<address of +0>
 *   linuxboot: zeropage loader=XX version=XXXX loadflags=XX code32=XXXXXXXX
 *   linuxboot: pvh magic=XXXXXXXX version=N modules=N           (PVH)
 *   linuxboot: cmdline=<text>
 *   linuxboot: e820 addr=X size=X type=N                       (per entry)
 *   linuxboot: e820 entries=N ram=X above4g=X   (bytes of type 1; of them above 4 GiB)
 *   linuxboot: initrd addr=X size=X crc=XXXXXXXX   (zlib's CRC-32 of its bytes)
 *   linuxboot: rsdp addr=X sig=X    (the 8 signature bytes as a little-endian u64)
 *   linuxboot: acpi rsdp=X rev=N tables=N bad-checksums=N   (acpi.S: the tables walked)
 *   linuxboot: madt cpus=N ioapics=N overrides=N
 *   linuxboot: fadt pm1a-evt=X pm1a-cnt=X pm-tmr=X dsdt-s5=yes|no
 * Exits:  debug-exit value 0x10 (status 33); "poweroff" on the command line:
 *         PM1a_CNT SLP_EN, as Linux powers off (status 0); a bad magic
 *         (no "HdrS" in the zero page, a wrong hvm_start_info magic): 0x11.
 */
#include "guest.h"

	.equ KIND_ZEROPAGE, 1
	.equ KIND_PVH, 2
	/* zero page (struct boot_params) offsets */
	.equ BP_ACPI_RSDP_ADDR, 0x070
	.equ BP_EXT_RAMDISK_IMAGE, 0x0c0
	.equ BP_EXT_RAMDISK_SIZE, 0x0c4
	.equ BP_EXT_CMD_LINE_PTR, 0x0c8
	.equ BP_E820_ENTRIES, 0x1e8
	.equ BP_HDR_MAGIC, 0x202
	.equ BP_VERSION, 0x206
	.equ BP_TYPE_OF_LOADER, 0x210
	.equ BP_LOADFLAGS, 0x211
	.equ BP_CODE32_START, 0x214
	.equ BP_RAMDISK_IMAGE, 0x218
	.equ BP_RAMDISK_SIZE, 0x21c
	.equ BP_CMD_LINE_PTR, 0x228
	.equ BP_E820_TABLE, 0x2d0
	.equ E820_ENTRY_SIZE, 20
	/* struct hvm_start_info */
	.equ SI_MAGIC, 0x00
	.equ SI_VERSION, 0x04
	.equ SI_NR_MODULES, 0x0c
	.equ SI_MODLIST, 0x10
	.equ SI_CMDLINE, 0x18
	.equ SI_RSDP, 0x20
	.equ SI_MEMMAP, 0x28
	.equ SI_MEMMAP_ENTRIES, 0x30
	.equ PVH_MAGIC, 0x336ec578
	.equ MEMMAP_ENTRY_SIZE, 24
	/* setup header values */
	.equ SETUP_SECTS, 1		/* the boot sector and one more: 0x400 bytes */
	.equ LOADED_HIGH, 0x01
	.equ XLF_KERNEL_64, 0x01
	.equ KERNEL_ALIGN, 0x200000
	.equ INITRD_ADDR_MAX, 0x7fffffff
	.equ CMDLINE_SIZE, 2047

/* ---- the setup sectors (bzImage only): boot sector and setup header ---- */
	.section .setup, "a"
	.code16
setup_start:
	.org 0x1f1
	.byte SETUP_SECTS		/* 0x1f1 setup_sects */
	.word 0				/* 0x1f2 root_flags */
	.long linuxboot_syssize		/* 0x1f4 syssize (16-byte units) */
	.word 0				/* 0x1f8 ram_size (obsolete) */
	.word 0xffff			/* 0x1fa vid_mode: normal */
	.word 0				/* 0x1fc root_dev */
	.word 0xaa55			/* 0x1fe boot_flag */
	.byte 0xeb, setup_hdr_end - (setup_start + 0x202)	/* 0x200 jump over the header */
	.ascii "HdrS"			/* 0x202 header */
	.word 0x020f			/* 0x206 version 2.15 */
	.long 0				/* 0x208 realmode_swtch */
	.word 0				/* 0x20c start_sys_seg */
	.word 0				/* 0x20e kernel_version */
	.byte 0				/* 0x210 type_of_loader (the loader's) */
	.byte LOADED_HIGH		/* 0x211 loadflags */
	.word 0				/* 0x212 setup_move_size */
	.long _kstart			/* 0x214 code32_start */
	.long 0, 0			/* 0x218 ramdisk_image, ramdisk_size */
	.long 0				/* 0x220 bootsect_kludge */
	.word 0				/* 0x224 heap_end_ptr */
	.byte 0, 0			/* 0x226 ext_loader_ver, ext_loader_type */
	.long 0				/* 0x228 cmd_line_ptr */
	.long INITRD_ADDR_MAX		/* 0x22c initrd_addr_max */
	.long KERNEL_ALIGN		/* 0x230 kernel_alignment */
	.byte 1				/* 0x234 relocatable_kernel */
	.byte 21			/* 0x235 min_alignment: 2 MiB */
	.word XLF_KERNEL_64		/* 0x236 xloadflags */
	.long CMDLINE_SIZE		/* 0x238 cmdline_size */
	.long 0				/* 0x23c hardware_subarch */
	.quad 0				/* 0x240 hardware_subarch_data */
	.long 0, 0			/* 0x248 payload_offset, payload_length */
	.quad 0				/* 0x250 setup_data */
	.quad _kstart			/* 0x258 pref_address */
	.long linuxboot_init_size	/* 0x260 init_size */
	.long 0				/* 0x264 handover_offset */
	.long 0				/* 0x268 kernel_info_offset */
setup_hdr_end:				/* real-mode setup: never run by minivmm */
1:	cli
	hlt
	jmp 1b
	.org (SETUP_SECTS + 1) * 512

/* ---- the protected-mode part: the entries at +0 and +0x200 ---- */
	.section .text.head, "ax"
	.code32
	.globl startup_32
startup_32:				/* +0: Linux's 32-bit entry, ESI = zero page */
	mov %esi, info_ptr
	movl $KIND_ZEROPAGE, kind
	jmp entry32
	.org 0x200
	.code64
	.globl startup_64
startup_64:				/* +0x200: the 64-bit entry, RSI = zero page */
	mov %rsi, info_ptr
	movl $KIND_ZEROPAGE, kind
	movl $64, entry_bits
	jmp cpl0_64

	.code32
	.globl pvh_start
pvh_start:				/* PVH: EBX = hvm_start_info, paging off */
	mov %ebx, info_ptr
	movl $KIND_PVH, kind
entry32:
	movl $32, entry_bits
	jmp long_from_32		/* long32.S: on to long_entry */

	.code64
long_entry:
cpl0_64:
	mov $kstack_top, %esp
	mov $user_main, %edi
	mov $ustack_top, %esi
	jmp enter_user

/* ---- everything below runs at CPL3 ---- */
	.text

/* crc32: zlib's CRC-32 of %rcx bytes at %rsi, in %eax. */
crc32:
	push %rcx
	push %rdx
	push %rsi
	push %r8
	mov $0xffffffff, %eax
1:	test %rcx, %rcx
	jz 3f
	movzbl (%rsi), %edx
	xor %edx, %eax
	mov $8, %r8d
2:	shr $1, %eax			/* CF = the bit shifted out */
	jnc 4f
	xor $0xedb88320, %eax
4:	dec %r8d
	jnz 2b
	inc %rsi
	dec %rcx
	jmp 1b
3:	not %eax
	pop %r8
	pop %rsi
	pop %rdx
	pop %rcx
	ret

/* hex16: print %rax as 16 hex digits.  hex8: %eax as 8. */
hex16:
	push %rcx
	mov $16, %ecx
	call puthex
	pop %rcx
	ret
hex8:
	push %rcx
	mov $8, %ecx
	call puthex
	pop %rcx
	ret

/* e820: print and sum %ecx entries of %rdx bytes each at %rsi (u64 addr, u64 size, u32 type). */
e820:
	xor %r9d, %r9d			/* RAM bytes */
	xor %r10d, %r10d		/* RAM bytes above 4 GiB */
	mov %ecx, %r11d			/* the count, for the summary */
	mov $4, %r12d
	shl $30, %r12			/* 4 GiB */
1:	test %ecx, %ecx
	jz 3f
	PRINT("linuxboot: e820 addr=")
	mov (%rsi), %rax
	call hex16
	PRINT(" size=")
	mov 8(%rsi), %rax
	call hex16
	PRINT(" type=")
	mov 16(%rsi), %eax
	call putdec
	PUTC('\n')
	cmpl $1, 16(%rsi)
	jne 2f
	add 8(%rsi), %r9
	mov (%rsi), %rax		/* the part above 4 GiB: end - max(addr, 4G) */
	mov %rax, %rbx
	add 8(%rsi), %rbx		/* end */
	cmp %r12, %rax
	jae 5f
	mov %r12, %rax
5:	cmp %rax, %rbx
	jbe 2f
	sub %rax, %rbx
	add %rbx, %r10
2:	add %rdx, %rsi
	dec %ecx
	jmp 1b
3:	PRINT("linuxboot: e820 entries=")
	mov %r11d, %eax
	call putdec
	PRINT(" ram=")
	mov %r9, %rax
	call hex16
	PRINT(" above4g=")
	mov %r10, %rax
	call hex16
	PUTC('\n')
	ret

user_main:
	mov info_ptr, %rbx
	PRINT("linuxboot: boot=")
	cmpl $KIND_PVH, kind
	jne 1f
	PRINT("pvh")
	jmp 2f
1:	PRINT("bzimage")
2:	PRINT(" entry=")
	mov entry_bits, %eax
	call putdec
	PRINT(" load=")
	lea startup_32(%rip), %rax	/* where this code really is */
	call hex16
	PUTC('\n')
	cmpl $KIND_PVH, kind
	je pvh_main

zeropage_main:
	cmpl $0x53726448, BP_HDR_MAGIC(%rbx)	/* "HdrS": the header was copied in */
	jne bad_magic
	PRINT("linuxboot: zeropage loader=")
	movzbl BP_TYPE_OF_LOADER(%rbx), %eax
	mov $2, %ecx
	call puthex
	PRINT(" version=")
	movzwl BP_VERSION(%rbx), %eax
	mov $4, %ecx
	call puthex
	PRINT(" loadflags=")
	movzbl BP_LOADFLAGS(%rbx), %eax
	mov $2, %ecx
	call puthex
	PRINT(" code32=")
	mov BP_CODE32_START(%rbx), %eax
	call hex8
	PUTC('\n')
	mov BP_EXT_CMD_LINE_PTR(%rbx), %eax	/* cmd_line_ptr | ext << 32 */
	shl $32, %rax
	mov BP_CMD_LINE_PTR(%rbx), %ecx
	or %rcx, %rax
	mov %rax, cmdline
	lea BP_E820_TABLE(%rbx), %rsi
	movzbl BP_E820_ENTRIES(%rbx), %ecx
	mov $E820_ENTRY_SIZE, %edx
	mov %rsi, e820_at
	mov %ecx, e820_count
	mov %rdx, e820_stride
	mov BP_EXT_RAMDISK_IMAGE(%rbx), %eax
	shl $32, %rax
	mov BP_RAMDISK_IMAGE(%rbx), %ecx
	or %rcx, %rax
	mov %rax, initrd_addr
	mov BP_EXT_RAMDISK_SIZE(%rbx), %eax
	shl $32, %rax
	mov BP_RAMDISK_SIZE(%rbx), %ecx
	or %rcx, %rax
	mov %rax, initrd_size
	mov BP_ACPI_RSDP_ADDR(%rbx), %rax
	mov %rax, rsdp
	jmp report

pvh_main:
	cmpl $PVH_MAGIC, SI_MAGIC(%rbx)
	jne bad_magic
	PRINT("linuxboot: pvh magic=")
	mov SI_MAGIC(%rbx), %eax
	call hex8
	PRINT(" version=")
	mov SI_VERSION(%rbx), %eax
	call putdec
	PRINT(" modules=")
	mov SI_NR_MODULES(%rbx), %eax
	call putdec
	PUTC('\n')
	mov SI_CMDLINE(%rbx), %rax
	mov %rax, cmdline
	mov SI_MEMMAP(%rbx), %rax
	mov %rax, e820_at
	mov SI_MEMMAP_ENTRIES(%rbx), %eax
	mov %eax, e820_count
	movq $MEMMAP_ENTRY_SIZE, e820_stride
	cmpl $0, SI_NR_MODULES(%rbx)
	je 1f
	mov SI_MODLIST(%rbx), %rsi	/* the first module: paddr, size */
	mov (%rsi), %rax
	mov %rax, initrd_addr
	mov 8(%rsi), %rax
	mov %rax, initrd_size
1:	mov SI_RSDP(%rbx), %rax
	mov %rax, rsdp

report:
	PRINT("linuxboot: cmdline=")
	mov cmdline, %rsi
	test %rsi, %rsi
	jz 1f
	call puts
1:	PUTC('\n')
	mov e820_at, %rsi
	mov e820_count, %ecx
	cmp $128, %ecx			/* never walk a garbage count far */
	jbe 2f
	mov $128, %ecx
2:	mov e820_stride, %rdx
	call e820
	PRINT("linuxboot: initrd addr=")
	mov initrd_addr, %rax
	call hex16
	PRINT(" size=")
	mov initrd_size, %rax
	call hex16
	PRINT(" crc=")
	mov initrd_addr, %rsi
	mov initrd_size, %rcx
	call crc32
	call hex8
	PUTC('\n')
	PRINT("linuxboot: rsdp addr=")
	mov rsdp, %rax
	call hex16
	PRINT(" sig=")
	mov rsdp, %rsi
	xor %eax, %eax
	test %rsi, %rsi
	jz 3f
	mov (%rsi), %rax
3:	call hex16
	PUTC('\n')
	mov rsdp, %rsi			/* the tables it points at, walked as an OS walks them */
	test %rsi, %rsi
	jz 5f
	call acpi_walk
	call acpi_report
5:
	mov cmdline, %rsi
	mov $word_poweroff, %edi
	call cmd_find
	test %rax, %rax
	jz 4f
	PRINT("linuxboot: poweroff\n")
	mov $PORT_ACPI_PM1A_CNT, %dx	/* SLP_TYP 0 (_S5), SLP_EN: as Linux */
	mov $POWEROFF_VALUE, %ax
	out %ax, %dx
5:	pause
	jmp 5b
4:	mov $0x10, %al
	jmp guest_exit

bad_magic:
	PRINT("linuxboot: bad magic\n")
	mov $0x11, %al
	jmp guest_exit

#include "user64.S"
#include "serial.S"
#include "cmdline.S"
#include "acpi.S"
#include "long32.S"

	.section .rodata
acpi_prefix:	.asciz "linuxboot"
word_poweroff:	.asciz "poweroff"

/* Xen's PVH entry note (kept by linuxpvh.ld only): namesz, descsz, type, "Xen", the entry. */
	.section .note.Xen, "a", @note
	.balign 4
	.long 4, 4, 18			/* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.long pvh_start

	.data
	.balign 8
info_ptr:	.quad 0			/* the zero page or hvm_start_info */
kind:		.long 0
entry_bits:	.long 0
cmdline:	.quad 0
e820_at:	.quad 0
e820_stride:	.quad 0
e820_count:	.long 0
	.balign 8
initrd_addr:	.quad 0
initrd_size:	.quad 0
rsdp:		.quad 0

	.bss
	.balign 16
	.space 1024
kstack_top:
	.space 8192
ustack_top:
