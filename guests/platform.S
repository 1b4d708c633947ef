/*
 * platform.S - what a test guest finds on minivmm's PC (pc or q35), read the
 * way kvm-unit-tests' start-up code reads it: fw_cfg, the ACPI tables, the
 * ACPI PM timer, PCI configuration space by both mechanisms, and (with
 * "testdev" on the command line) QEMU's pc-testdev.
 *
 * One source, two images:
 *   platform.elf     ELF64, minivmm's direct long-mode boot (elf64.ld).
 *   platformpvh.elf  the same guest entered through PVH (elf64pvh.ld: Xen's
 *                    PHYS32_ENTRY note), as QEMU boots it too, so both VMMs
 *                    run the very same image; long32.S takes it to long mode.
 * CPL0 only saves the command line; everything runs at CPL3 (see user64.S),
 * where it is native.
 *
 * Run:    minivmm [-M q35] -kernel platform.elf -smp 2 -device isa-debug-exit,iobase=0xf4,iosize=0x4
 *                 [-device pc-testdev -append testdev]
 * Prints: platform: fw_cfg signature=QEMU id=XXXXXXXX cpus=N max=N ram=XXXXXXXXXXXXXXXX files=N
 *         platform: acpi rsdp=XXXXXXXX rev=N tables=N bad-checksums=N
 *         platform: madt cpus=N ioapics=N overrides=N
 *         platform: fadt pm1a-evt=XXXX pm1a-cnt=XXXX pm-tmr=XXXX dsdt-s5=yes|no
 *         platform: mcfg base=XXXXXXXXXXXXXXXX segment=N buses=N-N   (or "mcfg none")
 *         platform: dsdt pci-hid=PNP0A08|PNP0A03|none pci-cid=PNP0A03|none prt=yes|no
 *         platform: pm-timer advances=yes|no
 *         platform: testdev data=XXXXXXXX iomem=XXXXXXXX     (with "testdev")
 *         platform: pci 00:SS.0 id=VVVV:DDDD class=CCCCCC bar0=XXXXXXXX bar1=XXXXXXXX irq=N
 *                                                   (with "pci": each device on bus 0, by 0xcf8)
 *         platform: edu id=XXXXXXXX live=XXXXXXXX fact10=XXXXXXXX dma=ok|bad
 *         platform: edu intx-pin=N rirr=N   (INTA raised; the IOAPIC pin the interrupt line names,
 *             level-triggered, and its remote IRR: 1 when the IOAPIC delivered it)
 *         platform: pci-testdev name=<test 0's name> hits=N datamatch=N port=<name>
 *         platform: ecam 00:SS.0 id=VVVV:DDDD same=yes|no ext=XXXXXXXX bar0-mask=XXXXXXXX restored=yes|no
 *             (with "pci" and an MCFG with segment 0 from bus 0: each device on bus 0 through
 *             ECAM: its first 64 bytes compared with 0xcf8's, the dword at 0x100, BAR0 sized
 *             through ECAM with decoding off, and back as 0xcf8 reads it)
 *         platform: mch pciexbar=XXXXXXXXXXXXXXXX     (the q35 host bridge, through ECAM)
 *         platform: lpc pmbase=XXXXXXXX acpi-cntl=XX  (the ICH9 LPC bridge, through ECAM)
 *         platform: ecam bus1=XXXXXXXX                (bus 1's 00.0, which no machine has)
 *         (with "pci iommu" and a DMAR table: the VT-d unit driven as kvm-unit-tests' intel_iommu test does)
 *         platform: dmar haw=N flags=XX          (the DMAR header: host address width - 1, INTR_REMAP)
 *         platform: dmar drhd flags=XX segment=N base=XXXXXXXXXXXXXXXX
 *         platform: dmar scope type=N id=N path=BB:DD.F   (each device scope of the DRHD)
 *         platform: vtd ver=XXXXXXXX cap=XXXXXXXXXXXXXXXX ecap=XXXXXXXXXXXXXXXX gsts=XXXXXXXX fsts=XXXXXXXX
 *         platform: vtd enabled gsts=XXXXXXXX    (after QI, root table, IR table, translation, IR)
 *         platform: vtd qi status=XXXXXXXX iqh=XXXXXXXXXXXXXXXX   (a wait descriptor's status write)
 *         platform: vtd dma=ok|bad               (edu: IOVA 0 -> the device -> IOVA 8, through
 *             root, context (39-bit, 3 levels) and second-level tables to one page)
 *         platform: vtd fault fsts=XXXXXXXX frcd-hi=XXXXXXXXXXXXXXXX frcd-lo=XXXXXXXXXXXXXXXX cleared=XXXXXXXX
 *             (edu writes to IOVA 0x1000, mapped read-only: the recorded fault, then FSTS once F is cleared)
 *         platform: vtd ir ioapic=yes|no msi=yes|no   (edu's INTA through a remappable IOAPIC entry
 *             (IRTE 1, vector 0xed), then its MSI in remappable format (IRTE 2, vector 0xee): seen in
 *             the local APIC's IRR, IF staying 0)
 *         platform: vtd ir-fault fsts=XXXXXXXX frcd-hi=XXXXXXXXXXXXXXXX frcd-lo=XXXXXXXXXXXXXXXX
 *             (an MSI naming IRTE 3, not present)
 *         platform: vtd qi-error fsts=XXXXXXXX iqh=XXXXXXXXXXXXXXXX   (a descriptor of type 0)
 *         platform: s3 suspending     (with "s3": as kvm-unit-tests' s3 test, suspend to
 *             RAM with the RTC alarm set to wake the machine; the resume code, run in real
 *             mode from the FACS waking vector, exits with the value it finds at address 0:
 *             0x10 (status 33) when the suspend happened, 1 (status 3) if it did not)
 * Exits:  debug-exit value 0x10 (status 33); no RSDP: 0x11 (status 35).
 */
#include "guest.h"

	.equ FW_CFG_SEL, PORT_FW_CFG
	.equ FW_CFG_DATA, PORT_FW_CFG + 1
	.equ FW_SIGNATURE, 0x00
	.equ FW_ID, 0x01
	.equ FW_RAM_SIZE, 0x03
	.equ FW_NB_CPUS, 0x05
	.equ FW_MAX_CPUS, 0x0f
	.equ FW_FILE_DIR, 0x19
	.equ RSDP_SCAN_START, 0xe0000
	.equ RSDP_SCAN_END, 0x100000
	.equ TESTDEV_PORT, 0xe0
	.equ TESTDEV_BYTE_PORT, 0xe8
	.equ TESTDEV_IOMEM, 0xff000000
	.equ PCI_ADDR_PORT, PORT_PCI_CONFIG
	.equ PCI_DATA_PORT, PORT_PCI_CONFIG + 4
	.equ PCI_ENABLE, 0x80000000
	.equ EDU_ID, 0x11e81234		/* device << 16 | vendor */
	.equ PCI_TESTDEV_ID, 0x00051b36
	.equ MCH_ID, 0x29c08086
	.equ LPC_ID, 0x29188086
	.equ ECAM_SLOT_SHIFT, 15
	.equ ECAM_BUS_SIZE, 0x100000
	.equ NAME_HID, 0x4449485f	/* "_HID" */
	.equ NAME_CID, 0x4449435f	/* "_CID" */
	.equ NAME_PRT, 0x5452505f	/* "_PRT" */
	.equ EISA_PNP0A03, 0x030ad041	/* EisaId ("PNP0A03"): PCI bus */
	.equ EISA_PNP0A08, 0x080ad041	/* EisaId ("PNP0A08"): PCI Express bus */
	.equ AML_DWORD_PREFIX, 0x0c
	.equ SI_CMDLINE, 0x18		/* hvm_start_info's cmdline_paddr */
	.equ IOAPIC_IOWIN, 0x10		/* IOAPIC_ADDR + 0: register select */
	.equ IOAPIC_REG_TABLE, 0x10	/* pin n: low half at 0x10 + 2n */
	.equ IOAPIC_LEVEL, 1 << 15
	.equ IOAPIC_MASKED, 1 << 16
	.equ IOAPIC_REMOTE_IRR_BIT, 14
	.equ INTX_VECTOR, 0x60
	.equ LAPIC_SVR, 0xf0		/* LAPIC_ADDR + 0xf0: spurious vector, software enable */
	.equ LAPIC_SVR_ENABLE, 0x100
	.equ SPURIOUS_VECTOR, 0xff
	.equ EDU_DMA_BUF, 0x40000
	.equ VTD_CAP, 0x08		/* VT-d registers, from the DRHD's base */
	.equ VTD_ECAP, 0x10
	.equ VTD_GCMD, 0x18
	.equ VTD_GSTS, 0x1c
	.equ VTD_RTADDR, 0x20
	.equ VTD_FSTS, 0x34
	.equ VTD_IQH, 0x80
	.equ VTD_IQT, 0x88
	.equ VTD_IQA, 0x90
	.equ VTD_IRTA, 0xb8
	.equ VTD_FRCD, 0x220
	.equ GCMD_TE, 1 << 31
	.equ GCMD_SRTP, 1 << 30
	.equ GCMD_QIE, 1 << 26
	.equ GCMD_IRE, 1 << 25
	.equ GCMD_SIRTP, 1 << 24
	.equ ECAP_IR, 1 << 3
	.equ VTD_IOVA_RO, 0x1000	/* mapped read-only */
	.equ IRTE_IOAPIC, 1
	.equ IRTE_MSI, 2
	.equ IRTE_ABSENT, 3
	.equ IOAPIC_SOURCE_ID, 0xff00	/* the DMAR scope's 0xff:00.0 */
	.equ VECTOR_IOAPIC, 0xed	/* kvm-unit-tests' vectors */
	.equ VECTOR_MSI, 0xee
	.equ LAPIC_IRR_EDEE, 0x270	/* the IRR word holding vectors 0xe0-0xff */
	.equ MSI_REMAPPABLE, 1 << 4
	.equ MSI_ENABLE, 1 << 16	/* in the dword at the MSI capability */
	.equ EDU_MSI_CAP, 0x40
	.equ S3_RESUME_VECTOR, 0x1000
	.equ S3_SLEEP, 0x2400		/* SLP_EN | SLP_TYP 1 (the DSDT's _S3) */
	.equ RTC_EN, 0x400
	.equ RTC_REG_A, 0x0a
	.equ RTC_REG_B, 0x0b
	.equ RTC_REG_C, 0x0c
	.equ RTC_UIP, 0x80
	.equ RTC_AIE, 0x20
	.equ RTC_DONT_CARE, 0xc0

	.code64
	.text
	.globl _start
_start:					/* CPL0: keep this short. RBX = the multiboot information */
	xor %esi, %esi
	testl $MBI_FLAG_CMDLINE, MBI_FLAGS(%rbx)
	jz start64
	mov MBI_CMDLINE(%rbx), %esi
start64:				/* %rsi = the command line (0: none) */
	mov $kstack_top, %rsp
	mov %rsi, cmdline
	mov $user_main, %edi
	mov $ustack_top, %esi
	jmp enter_user

/* The PVH entry (platformpvh.elf only): EBX = hvm_start_info, 32-bit, paging off. */
	.section .pvh.text, "ax"
	.code32
	.globl pvh_start
pvh_start:
	mov %ebx, pvh_info
	jmp long_from_32		/* long32.S: on to long_entry */
	.code64
long_entry:
	mov pvh_info, %ebx
	mov SI_CMDLINE(%rbx), %rsi
	jmp start64
	.text

/* ---- everything below runs at CPL3 ---- */

/* fw_select: select item %ax.  fw_read: the next %ecx (1-8) bytes, little-endian, in %rax. */
fw_select:
	push %rdx
	mov $FW_CFG_SEL, %dx
	out %ax, %dx
	pop %rdx
	ret
fw_read:
	push %rcx
	push %rdx
	push %rbx
	xor %ebx, %ebx			/* the value */
	xor %edx, %edx			/* bit position of the next byte */
1:	push %rdx
	mov $FW_CFG_DATA, %dx
	xor %eax, %eax
	in %dx, %al
	pop %rdx
	push %rcx
	mov %edx, %ecx
	shl %cl, %rax
	pop %rcx
	or %rax, %rbx
	add $8, %edx
	dec %ecx
	jnz 1b
	mov %rbx, %rax
	pop %rbx
	pop %rdx
	pop %rcx
	ret

user_main:
	/* fw_cfg */
	mov $FW_SIGNATURE, %ax
	call fw_select
	mov $4, %ecx
	call fw_read
	mov %eax, signature
	mov $FW_ID, %ax
	call fw_select
	call fw_read
	mov %eax, fw_id
	mov $FW_NB_CPUS, %ax
	call fw_select
	mov $2, %ecx
	call fw_read
	mov %eax, nb_cpus
	mov $FW_MAX_CPUS, %ax
	call fw_select
	call fw_read
	mov %eax, max_cpus
	mov $FW_RAM_SIZE, %ax
	call fw_select
	mov $8, %ecx
	call fw_read
	mov %rax, ram_size
	mov $FW_FILE_DIR, %ax
	call fw_select
	mov $4, %ecx
	call fw_read
	bswap %eax			/* the directory's count is big-endian */
	mov %eax, files

	PRINT("platform: fw_cfg signature=")
	mov $signature, %esi
	call puts
	PRINT(" id=")
	mov fw_id, %eax
	mov $8, %ecx
	call puthex
	PRINT(" cpus=")
	mov nb_cpus, %eax
	call putdec
	PRINT(" max=")
	mov max_cpus, %eax
	call putdec
	PRINT(" ram=")
	mov ram_size, %rax
	mov $16, %ecx
	call puthex
	PRINT(" files=")
	mov files, %eax
	call putdec
	PUTC('\n')

	mov $RSDP_SCAN_START, %esi	/* ACPI: the RSDP, 16-byte aligned in 0xe0000-0xfffff */
1:	movabs $0x2052545020445352, %rax	/* "RSD PTR " */
	cmp %rax, (%rsi)
	je 2f
	add $16, %esi
	cmp $RSDP_SCAN_END, %esi
	jb 1b
	PRINT("platform: acpi no RSDP\n")
	mov $0x11, %al
	jmp guest_exit
2:	call acpi_walk
	call acpi_report
	call mcfg_report
	call dsdt_report

	/* the PM timer (a 3.58 MHz counter) moves */
	mov acpi_pm_tmr, %edx
	test %edx, %edx
	jz 3f
	in %dx, %eax
	mov %eax, %ebx
	mov $1000000, %ecx
2:	in %dx, %eax
	cmp %eax, %ebx
	jne 4f
	dec %ecx
	jnz 2b
3:	PRINT("platform: pm-timer advances=no\n")
	jmp 5f
4:	PRINT("platform: pm-timer advances=yes\n")
5:
	/* pc-testdev, when asked for */
	mov cmdline, %rsi
	mov $word_testdev, %edi
	call cmd_find
	test %rax, %rax
	jz 6f
	mov $0x12345678, %eax
	out %eax, $TESTDEV_PORT		/* the scratch register, 32 bits */
	mov $0xab, %al
	out %al, $TESTDEV_BYTE_PORT + 1	/* its byte lane 1, through the byte view */
	in $TESTDEV_PORT, %eax
	mov %eax, %ebx
	mov $TESTDEV_IOMEM, %edi
	movl $0xdeadbeef, 0x100(%rdi)	/* scratch memory behind MMIO exits */
	mov 0x100(%rdi), %edx
	PRINT("platform: testdev data=")
	mov %ebx, %eax
	mov $8, %ecx
	call puthex
	PRINT(" iomem=")
	mov %edx, %eax
	call puthex
	PUTC('\n')
6:	mov cmdline, %rsi
	mov $word_pci, %edi
	call cmd_find
	test %rax, %rax
	jz 7f
	call pci_scan
	cmpq $0, ecam_base
	je 8f
	call ecam_scan
8:	mov cmdline, %rsi
	mov $word_iommu, %edi
	call cmd_find
	test %rax, %rax
	jz 7f
	call iommu_check
7:	mov cmdline, %rsi
	mov $word_s3, %edi
	call cmd_find
	test %rax, %rax
	jnz s3
	mov $0x10, %al
	jmp guest_exit

/* s3: suspend to RAM and be woken by the RTC alarm (kvm-unit-tests' x86/s3.c, in assembly). */
s3:
	mov $resume_start, %esi		/* the resume code, to the waking vector */
	mov $S3_RESUME_VECTOR, %edi
	mov $resume_end - resume_start, %ecx
	rep movsb
	mov acpi_facs, %ebx
	movl $S3_RESUME_VECTOR, 12(%rbx)	/* FACS firmware_waking_vector */
	mov cmdline, %rsi		/* "noalarm": no RTC wake, the host must wake it (system_wakeup) */
	mov $word_noalarm, %edi
	call cmd_find
	test %rax, %rax
	jnz 1f
	mov acpi_pm1a_evt, %edx
	add $2, %edx			/* PM1a enable */
	mov $RTC_EN, %ax
	out %ax, %dx
1:	mov $RTC_REG_A, %al		/* the alarm fires at the next second: wait for an update */
	out %al, $PORT_CMOS
	in $PORT_CMOS + 1, %al
	test $RTC_UIP, %al
	jz 1b
2:	mov $RTC_REG_A, %al
	out %al, $PORT_CMOS
	in $PORT_CMOS + 1, %al
	test $RTC_UIP, %al
	jnz 2b
	mov $RTC_REG_C, %al
	out %al, $PORT_CMOS
	in $PORT_CMOS + 1, %al
	mov $1, %ecx			/* the seconds, minutes and hours alarms: "don't care" */
3:	mov %cl, %al
	out %al, $PORT_CMOS
	mov $RTC_DONT_CARE, %al
	out %al, $PORT_CMOS + 1
	add $2, %ecx
	cmp $7, %ecx
	jb 3b
	mov $RTC_REG_B, %al		/* alarm interrupt enable */
	out %al, $PORT_CMOS
	in $PORT_CMOS + 1, %al
	or $RTC_AIE, %al
	mov %al, %bl
	mov $RTC_REG_B, %al
	out %al, $PORT_CMOS
	mov %bl, %al
	out %al, $PORT_CMOS + 1
	PRINT("platform: s3 suspending\n")
	movl $0x10, 0			/* what the resume code reports if the suspend happens */
	mov acpi_pm1a_cnt, %edx
	mov $S3_SLEEP, %ax
	out %ax, %dx
4:	movl $1, 0			/* still running: the suspend did not happen */
	jmp 4b

/* pci_config: the dword at register %esi of slot %edi on bus 0, in %eax. */
pci_config:
	push %rdx
	mov %edi, %eax
	shl $11, %eax
	or %esi, %eax
	or $PCI_ENABLE, %eax
	mov $PCI_ADDR_PORT, %dx
	out %eax, %dx
	mov $PCI_DATA_PORT, %dx
	in %dx, %eax
	pop %rdx
	ret

pci_scan:
	xor %r12d, %r12d		/* slot */
1:	mov %r12d, %edi
	xor %esi, %esi
	call pci_config
	cmp $0xffffffff, %eax
	je 5f
	mov %eax, %r13d			/* device << 16 | vendor */
	PRINT("platform: pci 00:")
	call put_slot_id
	PRINT(" class=")
	mov $8, %esi
	call pci_config
	shr $8, %eax
	mov $6, %ecx
	call puthex
	PRINT(" bar0=")
	mov $0x10, %esi
	call pci_config
	mov %eax, %r14d
	mov $8, %ecx
	call puthex
	PRINT(" bar1=")
	mov $0x14, %esi
	call pci_config
	mov %eax, %r15d
	call puthex
	PRINT(" irq=")
	mov $0x3c, %esi
	call pci_config
	movzbl %al, %eax
	call putdec
	PUTC('\n')
	cmp $EDU_ID, %r13d
	jne 2f
	call edu_check
2:	cmp $PCI_TESTDEV_ID, %r13d
	jne 5f
	call testdev_check
5:	inc %r12d
	cmp $32, %r12d
	jb 1b
	ret

/* edu_check: %r14 = BAR0 (memory). */
edu_check:
	mov %r14d, %ebx
	and $0xfffffff0, %ebx
	mov %rbx, edu_bar
	mov %r12d, edu_slot
	PRINT("platform: edu id=")
	mov (%rbx), %eax
	mov $8, %ecx
	call puthex
	movl $0x12345678, 4(%rbx)	/* liveness: reads back inverted */
	PRINT(" live=")
	mov 4(%rbx), %eax
	call puthex
	movl $10, 8(%rbx)		/* factorial of 10, once the computing bit clears */
1:	testl $1, 0x20(%rbx)
	jnz 1b
	PRINT(" fact10=")
	mov 8(%rbx), %eax
	call puthex
	movq $dma_out, 0x80(%rbx)	/* RAM -> the device's buffer */
	movq $EDU_DMA_BUF, 0x88(%rbx)
	movq $8, 0x90(%rbx)
	movq $1, 0x98(%rbx)
2:	testq $1, 0x98(%rbx)
	jnz 2b
	movq $EDU_DMA_BUF, 0x80(%rbx)	/* and back, to another place */
	movq $dma_in, 0x88(%rbx)
	movq $8, 0x90(%rbx)
	movq $3, 0x98(%rbx)
3:	testq $1, 0x98(%rbx)
	jnz 3b
	mov dma_out, %rax
	mov $word_bad, %esi
	cmp dma_in, %rax
	jne 4f
	mov $word_ok, %esi
4:	PRINT(" dma=")
	call puts
	PUTC('\n')
	/* INTx: INTA raised and seen at the IOAPIC pin the interrupt line register names (IF stays
	   0: the level-triggered entry's remote IRR says the IOAPIC delivered it) */
	mov $LAPIC_ADDR, %edi		/* a software-disabled local APIC accepts no interrupt */
	movl $LAPIC_SVR_ENABLE | SPURIOUS_VECTOR, LAPIC_SVR(%rdi)
	mov %r12d, %edi
	mov $0x3c, %esi
	call pci_config
	movzbl %al, %ecx		/* the interrupt line: a GSI, an IOAPIC pin */
	mov $IOAPIC_ADDR, %edi
	lea IOAPIC_REG_TABLE + 1(, %rcx, 2), %eax
	mov %eax, (%rdi)
	movl $0, IOAPIC_IOWIN(%rdi)	/* destination: APIC 0 */
	lea IOAPIC_REG_TABLE(, %rcx, 2), %eax
	mov %eax, (%rdi)
	movl $INTX_VECTOR | IOAPIC_LEVEL, IOAPIC_IOWIN(%rdi)
	movl $1, 0x60(%rbx)		/* raise */
	mov IOAPIC_IOWIN(%rdi), %eax
	shr $IOAPIC_REMOTE_IRR_BIT, %eax
	and $1, %eax
	movl $1, 0x64(%rbx)		/* acknowledge: INTA falls */
	movl $INTX_VECTOR | IOAPIC_LEVEL | IOAPIC_MASKED, IOAPIC_IOWIN(%rdi)
	PRINT("platform: edu intx-pin=")
	xchg %eax, %ecx
	call putdec
	PRINT(" rirr=")
	mov %ecx, %eax
	call putdec
	PUTC('\n')
	ret

/* pci_config_write: write %edx to the dword at register %esi of slot %edi on bus 0. */
pci_config_write:
	push %rax
	push %rdx
	mov %edi, %eax
	shl $11, %eax
	or %esi, %eax
	or $PCI_ENABLE, %eax
	mov $PCI_ADDR_PORT, %dx
	out %eax, %dx
	mov (%rsp), %eax
	mov $PCI_DATA_PORT, %dx
	out %eax, %dx
	pop %rdx
	pop %rax
	ret

/* vtd_cmd: %rbx = the VT-d registers, %eax = a GCMD bit: set it with what GSTS has, wait for GSTS. */
vtd_cmd:
	push %rcx
	mov VTD_GSTS(%rbx), %ecx
	or %eax, %ecx
	mov %ecx, VTD_GCMD(%rbx)
1:	test %eax, VTD_GSTS(%rbx)
	jz 1b
	pop %rcx
	ret

/* edu_dma: 8 bytes from %rsi to %rdx, command %ecx (1: to the device, 3: from it), waited for. */
edu_dma:
	mov edu_bar, %rdi
	mov %rsi, 0x80(%rdi)
	mov %rdx, 0x88(%rdi)
	movq $8, 0x90(%rdi)
	mov %rcx, 0x98(%rdi)
1:	testq $1, 0x98(%rdi)
	jnz 1b
	ret

/* vtd_fault_report: " fsts=X frcd-hi=X frcd-lo=X" of the unit at %rbx. */
vtd_fault_report:
	PRINT(" fsts=")
	mov VTD_FSTS(%rbx), %eax
	mov $8, %ecx
	call puthex
	PRINT(" frcd-hi=")
	mov VTD_FRCD + 8(%rbx), %rax
	mov $16, %ecx
	call puthex
	PRINT(" frcd-lo=")
	mov VTD_FRCD(%rbx), %rax
	call puthex
	ret

/* edu_raise_seen: raise edu's interrupt, report whether vector %edx is now pending in the IRR
   (%eax = 1 if so), and acknowledge it at the device. */
edu_raise_seen:
	push %rdi
	push %rcx
	mov edu_bar, %rdi
	movl $1, 0x60(%rdi)
	mov $LAPIC_ADDR, %ecx
	mov LAPIC_IRR_EDEE(%rcx), %eax
	mov %edx, %ecx
	and $31, %ecx
	shr %cl, %eax
	and $1, %eax
	movl $1, 0x64(%rdi)
	pop %rcx
	pop %rdi
	ret

/* iommu_check: the DMAR table, then the VT-d unit it names, programmed as kvm-unit-tests' intel_iommu
   test does (QI, root table, IR table, translation, IR), DMA and interrupts of edu through it. */
iommu_check:
	mov acpi_dmar, %rsi
	test %rsi, %rsi
	jz 9f
	cmpq $0, edu_bar
	jnz 1f
9:	PRINT("platform: dmar none\n")
	ret
1:	PRINT("platform: dmar haw=")
	movzbl 36(%rsi), %eax
	call putdec
	PRINT(" flags=")
	movzbl 37(%rsi), %eax
	mov $2, %ecx
	call puthex
	PUTC('\n')
	lea 48(%rsi), %r13		/* the first remapping structure: the DRHD */
	PRINT("platform: dmar drhd flags=")
	movzbl 4(%r13), %eax
	mov $2, %ecx
	call puthex
	PRINT(" segment=")
	movzwl 6(%r13), %eax
	call putdec
	PRINT(" base=")
	mov 8(%r13), %rax
	mov %rax, vtd_base
	mov $16, %ecx
	call puthex
	PUTC('\n')
	movzwl 2(%r13), %r14d		/* its device scopes, to its end */
	add %r13, %r14
	lea 16(%r13), %r15
2:	cmp %r14, %r15
	jae 3f
	PRINT("platform: dmar scope type=")
	movzbl (%r15), %eax
	call putdec
	PRINT(" id=")
	movzbl 4(%r15), %eax
	call putdec
	PRINT(" path=")
	movzbl 5(%r15), %eax
	mov $2, %ecx
	call puthex
	PUTC(':')
	movzbl 6(%r15), %eax
	call puthex
	PUTC('.')
	movzbl 7(%r15), %eax
	call putdec
	PUTC('\n')
	movzbl 1(%r15), %eax
	test %eax, %eax
	jz 3f
	add %rax, %r15
	jmp 2b
3:	mov vtd_base, %rbx
	PRINT("platform: vtd ver=")
	mov (%rbx), %eax
	mov $8, %ecx
	call puthex
	PRINT(" cap=")
	mov VTD_CAP(%rbx), %rax
	mov $16, %ecx
	call puthex
	PRINT(" ecap=")
	mov VTD_ECAP(%rbx), %rax
	call puthex
	PRINT(" gsts=")
	mov VTD_GSTS(%rbx), %eax
	mov $8, %ecx
	call puthex
	PRINT(" fsts=")
	mov VTD_FSTS(%rbx), %eax
	call puthex
	PUTC('\n')
	mov edu_slot, %edi		/* bus master on, as kvm-unit-tests' pci_enable_defaults (firmware may leave it off) */
	mov $4, %esi
	call pci_config
	or $6, %eax			/* memory decoding, bus master */
	mov %eax, %edx
	and $0xffff, %edx		/* and no write-1-to-clear status bits */
	call pci_config_write
	/* the tables: bus 0's root entry -> a context table; edu's context entry -> 3 levels to vtd_page */
	movq $vtd_ctx + 1, vtd_root
	mov edu_slot, %eax
	shl $7, %eax			/* devfn * 16 */
	movq $vtd_l3 + 1, vtd_ctx(%rax)	/* present, multi-level, faults reported */
	movq $1 | 1 << 8, vtd_ctx + 8(%rax)	/* AW 39 bits, domain 1 */
	movq $vtd_l2 + 3, vtd_l3
	movq $vtd_l1 + 3, vtd_l2
	movq $vtd_page + 3, vtd_l1	/* IOVA 0: read and write */
	movq $vtd_page + 0x1001, vtd_l1 + 8	/* IOVA 0x1000: read only */
	movq $vtd_iq, VTD_IQA(%rbx)	/* one page: 256 descriptors */
	movq $0, VTD_IQT(%rbx)
	mov $GCMD_QIE, %eax
	call vtd_cmd
	movq $vtd_root, VTD_RTADDR(%rbx)
	mov $GCMD_SRTP, %eax
	call vtd_cmd
	mov VTD_ECAP(%rbx), %rax
	test $ECAP_IR, %eax
	jz 4f
	movq $vtd_irt + 7, VTD_IRTA(%rbx)	/* 2^(7+1) = 256 entries */
	mov $GCMD_SIRTP, %eax
	call vtd_cmd
4:	mov $GCMD_TE, %eax
	call vtd_cmd
	mov VTD_ECAP(%rbx), %rax
	test $ECAP_IR, %eax
	jz 5f
	mov $GCMD_IRE, %eax
	call vtd_cmd
5:	PRINT("platform: vtd enabled gsts=")
	mov VTD_GSTS(%rbx), %eax
	mov $8, %ecx
	call puthex
	PUTC('\n')
	/* queued invalidation: a wait descriptor with a status write */
	movabs $0xcafe000100000025, %rax	/* status data, SW, type 5 */
	mov %rax, vtd_iq
	movq $vtd_status, vtd_iq + 8
	movq $0x10, VTD_IQT(%rbx)
	mov $1000000, %ecx
6:	cmpl $0, vtd_status
	jne 7f
	dec %ecx
	jnz 6b
7:	PRINT("platform: vtd qi status=")
	mov vtd_status, %eax
	mov $8, %ecx
	call puthex
	PRINT(" iqh=")
	mov VTD_IQH(%rbx), %rax
	mov $16, %ecx
	call puthex
	PUTC('\n')
	/* DMA through the tables: IOVA 0 -> the device's buffer -> IOVA 8 */
	movabs $0x1122334455667788, %rax
	mov %rax, vtd_page
	xor %esi, %esi
	mov $EDU_DMA_BUF + 0x100, %edx
	mov $1, %ecx
	call edu_dma
	mov $EDU_DMA_BUF + 0x100, %esi
	mov $8, %edx
	mov $3, %ecx
	call edu_dma
	mov $word_bad, %esi
	mov vtd_page, %rax
	cmp vtd_page + 8, %rax
	jne 8f
	mov $word_ok, %esi
8:	PRINT("platform: vtd dma=")
	call puts
	PUTC('\n')
	/* a write to the read-only IOVA: a recorded fault, the page untouched */
	mov $EDU_DMA_BUF + 0x100, %esi
	mov $VTD_IOVA_RO, %edx
	mov $3, %ecx
	call edu_dma
	PRINT("platform: vtd fault")
	call vtd_fault_report
	movl $0x80000000, VTD_FRCD + 12(%rbx)	/* F is write-1-to-clear */
	PRINT(" cleared=")
	mov VTD_FSTS(%rbx), %eax
	mov $8, %ecx
	call puthex
	PUTC('\n')
	mov VTD_ECAP(%rbx), %rax
	test $ECAP_IR, %eax
	jnz 10f
	PRINT("platform: vtd ir none\n")
	jmp 20f
10:	/* interrupt remapping: IRTE 1 for the IOAPIC pin, IRTE 2 for edu's MSI; 3 stays absent */
	movq $1 | VECTOR_IOAPIC << 16, vtd_irt + 16 * IRTE_IOAPIC	/* present, fixed, edge, physical APIC 0 */
	movq $IOAPIC_SOURCE_ID | 1 << 18, vtd_irt + 16 * IRTE_IOAPIC + 8	/* full source-id check */
	movq $1 | VECTOR_MSI << 16, vtd_irt + 16 * IRTE_MSI
	mov edu_slot, %eax
	shl $3, %eax
	or $1 << 18, %eax
	mov %rax, vtd_irt + 16 * IRTE_MSI + 8
	mov edu_slot, %edi		/* the IOAPIC pin edu's INTA reaches: remappable, handle 1 */
	mov $0x3c, %esi
	call pci_config
	movzbl %al, %ecx
	mov $IOAPIC_ADDR, %edi
	lea IOAPIC_REG_TABLE + 1(, %rcx, 2), %eax
	mov %eax, (%rdi)
	movl $(1 | IRTE_IOAPIC << 1) << 16, IOAPIC_IOWIN(%rdi)	/* format (bit 48), index (49-63) */
	lea IOAPIC_REG_TABLE(, %rcx, 2), %eax
	mov %eax, (%rdi)
	movl $VECTOR_IOAPIC, IOAPIC_IOWIN(%rdi)	/* edge, unmasked */
	mov $VECTOR_IOAPIC, %edx
	call edu_raise_seen
	mov %eax, %r13d
	movl $VECTOR_IOAPIC | IOAPIC_MASKED, IOAPIC_IOWIN(%rdi)
	mov edu_slot, %edi		/* edu's MSI: remappable, handle 2 */
	mov $EDU_MSI_CAP + 4, %esi
	mov $LAPIC_ADDR | MSI_REMAPPABLE | IRTE_MSI << 5, %edx
	call pci_config_write
	mov $EDU_MSI_CAP + 8, %esi
	xor %edx, %edx
	call pci_config_write
	mov $EDU_MSI_CAP + 12, %esi
	call pci_config_write
	mov $EDU_MSI_CAP, %esi
	call pci_config
	or $MSI_ENABLE, %eax
	mov %eax, %edx
	call pci_config_write
	mov $VECTOR_MSI, %edx
	call edu_raise_seen
	mov %eax, %r14d
	PRINT("platform: vtd ir ioapic=")
	mov $acpi_word_no, %esi
	test %r13d, %r13d
	jz 11f
	mov $acpi_word_yes, %esi
11:	call puts
	PRINT(" msi=")
	mov $acpi_word_no, %esi
	test %r14d, %r14d
	jz 12f
	mov $acpi_word_yes, %esi
12:	call puts
	PUTC('\n')
	mov edu_slot, %edi		/* an MSI naming the absent IRTE 3: blocked, a recorded fault */
	mov $EDU_MSI_CAP + 4, %esi
	mov $LAPIC_ADDR | MSI_REMAPPABLE | IRTE_ABSENT << 5, %edx
	call pci_config_write
	mov $VECTOR_MSI, %edx
	call edu_raise_seen
	PRINT("platform: vtd ir-fault")
	call vtd_fault_report
	PUTC('\n')
	movl $0x80000000, VTD_FRCD + 12(%rbx)
20:	/* an invalid descriptor (type 0): the queue stops at it with IQE */
	movq $0, vtd_iq + 16
	movq $0, vtd_iq + 24
	movq $0x20, VTD_IQT(%rbx)
	PRINT("platform: vtd qi-error fsts=")
	mov VTD_FSTS(%rbx), %eax
	mov $8, %ecx
	call puthex
	PRINT(" iqh=")
	mov VTD_IQH(%rbx), %rax
	mov $16, %ecx
	call puthex
	PUTC('\n')
	ret

/* testdev_check: %r14 = BAR0 (memory), %r15 = BAR1 (I/O). */
testdev_check:
	mov %r14d, %ebx
	and $0xfffffff0, %ebx
	movb $0, (%rbx)			/* select test 0: mmio-no-eventfd */
	PRINT("platform: pci-testdev name=")
	lea 16(%rbx), %rsi		/* the name, after the 16-byte header (puts reads bytes) */
	call puts
	mov 4(%rbx), %ecx		/* the offset writes must hit, with the test's data byte */
	movzbl 8(%rbx), %edx
	mov %dl, (%rbx,%rcx)
	PRINT(" hits=")
	mov 12(%rbx), %eax
	call putdec
	movb $2, (%rbx)			/* test 2: datamatch-eventfd */
	mov 4(%rbx), %ecx
	movzbl 8(%rbx), %edx		/* its data byte */
	movb $0xce, (%rbx,%rcx)		/* a different value does not count */
	mov %dl, (%rbx,%rcx)		/* the data value does */
	PRINT(" datamatch=")
	mov 12(%rbx), %eax
	call putdec
	mov %r15d, %edx			/* the I/O BAR offers the same tests on ports */
	and $0xfffffffc, %edx
	xor %eax, %eax
	out %al, %dx
	PRINT(" port=")
	add $16, %edx
	mov $name_buf, %edi
1:	in %dx, %al
	mov %al, (%rdi)
	inc %rdi
	inc %edx
	test %al, %al
	jnz 1b
	mov $name_buf, %esi
	call puts
	PUTC('\n')
	ret

/* mcfg_report: the MCFG's first allocation; ecam_base is its base when it covers segment 0 from bus 0. */
mcfg_report:
	mov acpi_mcfg, %rbx
	test %rbx, %rbx
	jz 1f
	cmpl $60, 4(%rbx)		/* the header, 8 reserved bytes, one 16-byte allocation */
	jae 2f
1:	PRINT("platform: mcfg none\n")
	ret
2:	PRINT("platform: mcfg base=")
	mov 44(%rbx), %rax
	mov $16, %ecx
	call puthex
	PRINT(" segment=")
	movzwl 52(%rbx), %eax
	call putdec
	PRINT(" buses=")
	movzbl 54(%rbx), %eax
	call putdec
	PUTC('-')
	movzbl 55(%rbx), %eax
	call putdec
	PUTC('\n')
	cmpw $0, 52(%rbx)
	jne 3f
	cmpb $0, 54(%rbx)
	jne 3f
	mov 44(%rbx), %rax
	mov %rax, ecam_base
3:	ret

/* dsdt_has: does the DSDT hold the name %eax, followed (when %edx is not 0) by the DWord %edx,
   as Name (<name>, EisaId (...)) encodes it?  %eax = 1 if so, else 0. */
dsdt_has:
	push %rsi
	push %rcx
	mov acpi_dsdt, %rsi
	test %rsi, %rsi
	jz 3f
	mov 4(%rsi), %ecx
	sub $9, %ecx			/* the last place a name, a prefix and a DWord fit */
	jbe 3f
1:	cmp %eax, (%rsi)
	jne 2f
	test %edx, %edx
	jz 4f
	cmpb $AML_DWORD_PREFIX, 4(%rsi)
	jne 2f
	cmp %edx, 5(%rsi)
	je 4f
2:	inc %rsi
	dec %ecx
	jnz 1b
3:	xor %eax, %eax
	jmp 5f
4:	mov $1, %eax
5:	pop %rcx
	pop %rsi
	ret

/* dsdt_report: how the DSDT names the PCI root bridge, and whether it has a _PRT. */
dsdt_report:
	PRINT("platform: dsdt pci-hid=")
	mov $word_pnp0a08, %esi
	mov $NAME_HID, %eax
	mov $EISA_PNP0A08, %edx
	call dsdt_has
	test %eax, %eax
	jnz 1f
	mov $word_pnp0a03, %esi
	mov $NAME_HID, %eax
	mov $EISA_PNP0A03, %edx
	call dsdt_has
	test %eax, %eax
	jnz 1f
	mov $word_none, %esi
1:	call puts
	PRINT(" pci-cid=")
	mov $word_pnp0a03, %esi
	mov $NAME_CID, %eax
	mov $EISA_PNP0A03, %edx
	call dsdt_has
	test %eax, %eax
	jnz 2f
	mov $word_none, %esi
2:	call puts
	PRINT(" prt=")
	mov $acpi_word_yes, %esi
	mov $NAME_PRT, %eax
	xor %edx, %edx
	call dsdt_has
	test %eax, %eax
	jnz 3f
	mov $acpi_word_no, %esi
3:	call puts
	PUTC('\n')
	ret

/* ecam_scan: bus 0 again, through the ECAM window at ecam_base. */
ecam_scan:
	xor %r12d, %r12d		/* slot */
1:	mov %r12d, %ebx
	shl $ECAM_SLOT_SHIFT, %ebx
	add ecam_base, %rbx		/* its function 0's configuration space */
	mov (%rbx), %r13d		/* device << 16 | vendor */
	cmp $0xffffffff, %r13d
	je 9f
	PRINT("platform: ecam 00:")
	call put_slot_id
	mov $acpi_word_yes, %r14	/* the header, dword by dword, as 0xcf8 reads it */
	xor %esi, %esi
2:	mov %r12d, %edi
	call pci_config
	cmp (%rbx,%rsi), %eax
	je 3f
	mov $acpi_word_no, %r14
3:	add $4, %esi
	cmp $64, %esi
	jb 2b
	PRINT(" same=")
	mov %r14, %rsi
	call puts
	PRINT(" ext=")
	mov 0x100(%rbx), %eax		/* past a conventional function's 256 bytes */
	mov $8, %ecx
	call puthex
	movzwl 4(%rbx), %r14d		/* size BAR0 with decoding off, as an OS does */
	mov %r14d, %eax
	and $~3, %eax
	mov %ax, 4(%rbx)
	mov 0x10(%rbx), %r15d
	movl $0xffffffff, 0x10(%rbx)
	mov 0x10(%rbx), %eax
	mov %r15d, 0x10(%rbx)
	mov %r14w, 4(%rbx)
	PRINT(" bar0-mask=")
	call puthex
	PRINT(" restored=")
	mov %r12d, %edi
	mov $0x10, %esi
	call pci_config
	mov $acpi_word_yes, %esi
	cmp %r15d, %eax
	je 4f
	mov $acpi_word_no, %esi
4:	call puts
	PUTC('\n')
	cmp $MCH_ID, %r13d
	jne 5f
	PRINT("platform: mch pciexbar=")
	mov 0x64(%rbx), %eax		/* a 64-bit register, read as two dwords */
	shl $32, %rax
	mov 0x60(%rbx), %ecx
	or %rcx, %rax
	mov $16, %ecx
	call puthex
	PUTC('\n')
5:	cmp $LPC_ID, %r13d
	jne 9f
	PRINT("platform: lpc pmbase=")
	mov 0x40(%rbx), %eax
	mov $8, %ecx
	call puthex
	PRINT(" acpi-cntl=")
	movzbl 0x44(%rbx), %eax
	mov $2, %ecx
	call puthex
	PUTC('\n')
9:	inc %r12d
	cmp $32, %r12d
	jb 1b
	PRINT("platform: ecam bus1=")
	mov ecam_base, %rbx
	mov ECAM_BUS_SIZE(%rbx), %eax
	mov $8, %ecx
	call puthex
	PUTC('\n')
	ret

/* put_slot_id: print "SS.0 id=VVVV:DDDD" for slot r12d, id (device << 16 | vendor) r13d. */
put_slot_id:
	push %rax
	push %rcx
	mov %r12d, %eax
	mov $2, %ecx
	call puthex
	PRINT(".0 id=")
	mov %r13d, %eax
	mov $4, %ecx
	call puthex
	PUTC(':')
	shr $16, %eax
	call puthex
	pop %rcx
	pop %rax
	ret

#include "user64.S"
#include "serial.S"
#include "cmdline.S"
#include "acpi.S"
#define LONG32_TEXT .pvh.text
#define LONG32_DATA .pvh.data
#include "long32.S"

/* Run in real mode at the waking vector after the resume (copied there before the suspend). */
	.section .rodata
resume_start:
	.code16
	movl 0, %eax
	mov $DEBUG_EXIT_PORT, %dx
	outl %eax, %dx
1:	hlt
	jmp 1b
	.code64
resume_end:

	.section .rodata
word_testdev:	.asciz "testdev"
word_pci:	.asciz "pci"
word_iommu:	.asciz "iommu"
word_s3:	.asciz "s3"
word_noalarm:	.asciz "noalarm"
acpi_prefix:	.asciz "platform"
word_ok:	.asciz "ok"
word_bad:	.asciz "bad"
word_none:	.asciz "none"
word_pnp0a03:	.asciz "PNP0A03"
word_pnp0a08:	.asciz "PNP0A08"

/* Xen's PVH entry note (kept by elf64pvh.ld only): namesz, descsz, type, "Xen", the entry. */
	.section .note.Xen, "a", @note
	.balign 4
	.long 4, 4, 18			/* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.long pvh_start

	.section .pvh.data, "aw"
	.balign 8
pvh_info:	.quad 0			/* hvm_start_info */

	.data
	.balign 8
cmdline:	.quad 0
ram_size:	.quad 0
signature:	.long 0, 0		/* four characters and NULs */
fw_id:		.long 0
nb_cpus:	.long 0
max_cpus:	.long 0
files:		.long 0
	.balign 8
ecam_base:	.quad 0			/* from the MCFG: segment 0, bus 0 */
	.balign 8
dma_out:	.quad 0x0123456789abcdef
dma_in:		.quad 0
name_buf:	.space 64
	.balign 8
edu_bar:	.quad 0
edu_slot:	.long 0
	.balign 8
vtd_base:	.quad 0
vtd_status:	.long 0

	.bss
	.balign 4096			/* VT-d structures, one page each */
vtd_root:	.space 4096
vtd_ctx:	.space 4096
vtd_l3:	.space 4096
vtd_l2:	.space 4096
vtd_l1:	.space 4096
vtd_irt:	.space 4096
vtd_iq:	.space 4096
vtd_page:	.space 8192
	.balign 16
	.space 1024
kstack_top:
	.space 8192
ustack_top:
