/*
 * hello32.S - a multiboot v1 ELF32 guest that prints what the boot loader
 * told it: the magic in EAX and the multiboot information at EBX (memory
 * sizes, command line, memory map, modules).
 *
 * Run:    qemu-system-x86_64 -kernel hello32.elf -append "hi" \
 *             -initrd "file1 arg,file2"        (or minivmm, same options)
 * Prints: hello32: protected mode
 *         hello32: magic=2badb002
 *         hello32: mem_lower=640 mem_upper=N
 *         hello32: cmdline=<text>
 *         hello32: mmap base=0x... len=0x... type=N   (one per entry)
 *         hello32: mods=N
 *         hello32: mod I cmdline=<string> bytes=<size> first=<text>
 * Command line words:
 *         echo      then echo every byte received on COM1 until "q",
 *                   and print "hello32: bye"
 *         reboot    count boots in CMOS byte CMOS_BOOTS (CMOS survives a
 *                   reset) and print "hello32: boot N"; on the first boot
 *                   reset the machine through the i8042 (0xfe to port 0x64)
 *         panic     report a panic through pvpanic (-device pvpanic) and
 *                   halt: what happens next is the VMM's -action panic=
 *         exit=HH   exit with debug-exit value 0xHH (default 0x10)
 */
#include "guest.h"

	.equ FIRST_MAX, 32		/* bytes of each module to show */
	.equ CMOS_BOOTS, 0x40		/* a CMOS RAM byte no one else uses */
	.equ I8042_RESET, 0xfe
	.equ POST_STARTED, 0x32		/* written to port 0x80 at entry ... */
	.equ POST_DONE, 0x33		/* ... and just before exiting */
	.equ PVPANIC_PORT, 0x505	/* QEMU's pvpanic ISA device */
	.equ PVPANIC_PANICKED, 1

	MULTIBOOT_HEADER

	.code32
	.text
	.globl _start
_start:
	mov $stack_top, %esp		/* multiboot leaves ESP undefined */
	mov %eax, %edi			/* the magic */
	mov $POST_STARTED, %al		/* boot-phase markers: -d postcode shows them */
	out %al, $PORT_POST
	mov %ebx, %ebp			/* ebp = multiboot information */

	PRINT("hello32: protected mode\n")
	PRINT("hello32: magic=")
	mov %edi, %eax
	mov $8, %ecx
	call puthex
	PUTC('\n')

	PRINT("hello32: mem_lower=")
	mov MBI_MEM_LOWER(%ebp), %eax
	call putdec
	PRINT(" mem_upper=")
	mov MBI_MEM_UPPER(%ebp), %eax
	call putdec
	PUTC('\n')

	xor %esi, %esi			/* command line, or 0 */
	testl $MBI_FLAG_CMDLINE, MBI_FLAGS(%ebp)
	jz 1f
	mov MBI_CMDLINE(%ebp), %esi
1:	mov %esi, cmdline
	PRINT("hello32: cmdline=")
	test %esi, %esi
	jz 1f
	call puts
1:	PUTC('\n')

/* Memory map: entries of (u32 size, u64 base, u64 length, u32 type); the
 * size field does not count itself. */
	testl $MBI_FLAG_MMAP, MBI_FLAGS(%ebp)
	jz mmap_done
	mov MBI_MMAP_ADDR(%ebp), %ebx
	mov MBI_MMAP_LENGTH(%ebp), %edx
	add %ebx, %edx			/* edx = end of the map */
mmap_loop:
	cmp %edx, %ebx
	jae mmap_done
	PRINT("hello32: mmap base=0x")
	lea 4(%ebx), %esi
	call puthex64
	PRINT(" len=0x")
	lea 12(%ebx), %esi
	call puthex64
	PRINT(" type=")
	mov 20(%ebx), %eax
	call putdec
	PUTC('\n')
	mov (%ebx), %eax
	lea 4(%ebx, %eax), %ebx		/* next entry */
	jmp mmap_loop
mmap_done:

/* Modules: entries of (u32 start, u32 end, u32 string, u32 reserved). */
	xor %ecx, %ecx
	testl $MBI_FLAG_MODS, MBI_FLAGS(%ebp)
	jz 1f
	mov MBI_MODS_COUNT(%ebp), %ecx
1:	PRINT("hello32: mods=")
	mov %ecx, %eax
	call putdec
	PUTC('\n')
	mov MBI_MODS_ADDR(%ebp), %ebx
	xor %edi, %edi			/* edi = module number */
mod_loop:
	cmp %ecx, %edi
	jae mods_done
	PRINT("hello32: mod ")
	mov %edi, %eax
	call putdec
	PRINT(" cmdline=")
	mov 8(%ebx), %esi
	test %esi, %esi
	jz 1f
	call puts
1:	PRINT(" bytes=")
	mov 4(%ebx), %eax
	sub (%ebx), %eax
	call putdec
	PRINT(" first=")
	mov (%ebx), %esi		/* print up to FIRST_MAX bytes, */
	lea FIRST_MAX(%esi), %edx	/* stopping at a newline or the end */
	cmp 4(%ebx), %edx
	jb 2f
	mov 4(%ebx), %edx
2:	cmp %edx, %esi
	jae 3f
	mov (%esi), %al
	cmp $'\n', %al
	je 3f
	call putc
	inc %esi
	jmp 2b
3:	PUTC('\n')
	add $16, %ebx
	inc %edi
	jmp mod_loop
mods_done:

/* "echo": copy COM1 input back to COM1 until a "q" arrives. */
	mov cmdline, %esi
	mov $word_echo, %edi
	call cmd_find
	test %eax, %eax
	jz echo_done
	mov $'\n', %bl			/* last byte echoed */
1:	call getc
	cmp $'q', %al
	je 2f
	call putc
	mov %al, %bl
	jmp 1b
2:	cmp $'\n', %bl			/* start "bye" on a line of its own */
	je 3f
	PUTC('\n')
3:	PRINT("hello32: bye\n")
echo_done:

/* "reboot": reset once, then carry on. */
	mov cmdline, %esi
	mov $word_reboot, %edi
	call cmd_find
	test %eax, %eax
	jz reboot_done
	mov $CMOS_BOOTS, %al
	out %al, $PORT_CMOS
	in $PORT_CMOS + 1, %al
	inc %al
	mov %al, %bl
	mov $CMOS_BOOTS, %al
	out %al, $PORT_CMOS
	mov %bl, %al
	out %al, $PORT_CMOS + 1
	PRINT("hello32: boot ")
	movzbl %bl, %eax
	call putdec
	PUTC('\n')
	cmp $2, %bl
	jae reboot_done
	mov $I8042_RESET, %al
	out %al, $PORT_I8042_CMD
1:	hlt				/* the reset takes effect at once */
	jmp 1b
reboot_done:

/* "panic": tell the VMM, then stop here. */
	mov cmdline, %esi
	mov $word_panic, %edi
	call cmd_find
	test %eax, %eax
	jz 2f
	PRINT("hello32: panic\n")
	mov $PVPANIC_PANICKED, %al
	mov $PVPANIC_PORT, %dx
	out %al, %dx
1:	hlt
	jmp 1b
2:
	mov $POST_DONE, %al
	out %al, $PORT_POST

/* "exit=HH": the exit value. */
	mov cmdline, %esi
	mov $word_exit, %edi
	call cmd_find
	test %eax, %eax
	jz 1f
	mov %eax, %esi
	call parse_hex
	jmp guest_exit
1:	mov $0x10, %al
	jmp guest_exit

/* puthex64: print the u64 at (%esi) as 16 hex digits. */
puthex64:
	push %eax
	push %ecx
	mov $8, %ecx
	mov 4(%esi), %eax		/* high half first */
	call puthex
	mov (%esi), %eax
	call puthex
	pop %ecx
	pop %eax
	ret

#include "serial.S"
#include "cmdline.S"

	.section .rodata
word_echo:	.asciz "echo"
word_exit:	.asciz "exit="
word_reboot:	.asciz "reboot"
word_panic:	.asciz "panic"

	.data
cmdline:	.long 0

	.bss
	.balign 16
	.space 4096
stack_top:
