/*
 * timer.S - multiboot ELF32 guest that takes hardware interrupts: the PIT
 * through the 8259 PIC, the local APIC timer, or the serial port.
 *
 * Run:    qemu-system-x86_64 -kernel timer.elf -append "pit 100"
 * Command line (one of):
 *         pit N     PIT channel 0 at 1000 Hz on IRQ 0 (vector 0x20); after N
 *                   ticks prints "timer: pit ticks=N".  The default, with
 *                   N = 100, when no word is given.
 *         lapic N   LAPIC timer, periodic, 1 ms (1000000 counts of KVM's
 *                   1 GHz APIC bus, divide by 1), vector 0x40; after N
 *                   interrupts prints "timer: lapic ticks=N".
 *         oneshot N the LAPIC timer in one-shot mode, re-armed by each
 *                   interrupt's handler: "timer: oneshot ticks=N".
 *         tscdeadline N  the LAPIC timer in TSC-deadline mode (CPUID.1:ECX
 *                   bit 24), each handler writing the next deadline to
 *                   IA32_TSC_DEADLINE: "timer: tscdeadline ticks=N", or
 *                   "timer: tscdeadline unsupported" without the bit.
 *         serial    COM1 receive interrupts on IRQ 4 (vector 0x24); prints
 *                   "timer: got X" for every byte received and, after "q",
 *                   "timer: serial done".
 *         ioapic N  through the IOAPIC, the PIC masked: prints its version
 *                   register ("timer: ioapic version=XXXXXXXX"), takes N PIT
 *                   ticks on pin 2, edge-triggered, vector 0x50 ("timer:
 *                   ioapic pit ticks=N"), then a level-triggered pin: with
 *                   -device pc-testdev, raises line 10 (vector 0x51) and
 *                   EOIs it twice while still high, lowering it in the
 *                   third handler; prints the interrupts taken ("timer:
 *                   ioapic level irqs=N", N >= 3: each EOI of a line still
 *                   high delivers it again; KVM's own IOAPIC here delivers
 *                   once more after the line falls, as under QEMU) and the
 *                   entry's remote IRR bit ("rirr=0").  "ioapic N eoi":
 *                   the handler also writes the vector to the IOAPIC's own
 *                   EOI register (0x40, from version 0x20 on), as Linux
 *                   does with directed EOI.
 *         pit2      PIT counter 2 as Linux calibrates the TSC with it:
 *                   gate on through port 0x61, mode 0, count 0xffff;
 *                   two latched reads must count down, the read-back
 *                   status byte is printed, then port 0x61 bit 5 (OUT2)
 *                   must rise at the terminal count: "timer: pit2
 *                   down=1 status=XX out2=1".
 *         vfiouser N  minivmm's sample vfio-user device (1234:4d56, served
 *                   by minivmm-vfio-user behind -device vfio-user-pci):
 *                   finds it through 0xcf8, prints its ID register
 *                   ("timer: vfiouser id=4D565531"), enables memory, bus
 *                   mastering and MSI (vector 0x52, to APIC 0), then runs N
 *                   DMA transfers of VU_LEN bytes, each from a buffer
 *                   filled with a pattern of its round to a cleared one,
 *                   each ending in an MSI; checks every copy and prints
 *                   "timer: vfiouser round=R" every 100 rounds, then
 *                   "timer: vfiouser rounds=N irqs=N counter=C" (C: the
 *                   device's count of transfers since its reset) or
 *                   "timer: vfiouser bad round=R status=S".
 *                   "vfiouser N msix": through MSI-X vector 0 instead,
 *                   its table and pending bits found through the
 *                   capability (a 64-bit BAR): first one transfer with
 *                   the vector masked after its set-up, whose interrupt
 *                   must wait in the
 *                   pending bit until the unmask ("timer: vfiouser msix
 *                   pending=1 early=0 delivered=1"), then the N rounds.
 *                   "vfiouser N intx": through INTx, the IOAPIC pin the
 *                   interrupt line names level-triggered (vector 0x53),
 *                   the handler counting only when the device's status
 *                   says a transfer ended ("timer: vfiouser intx line=L").
 *         (N missing or 0 means 100.)
 * Exits:  debug-exit value 0x10 (status 33).
 *
 * Interrupts only: no exceptions, no "int $n" (PVM cannot deliver those).
 * And no iret: KVM's instruction emulator implements IRET only in real
 * mode, so on PVM (where CPL0 code is emulated) an iret in protected mode
 * stops the VM with an emulation failure.  The handlers return with
 * IRET_SAME_CPL instead (below).
 */
#include "guest.h"

	.equ CODE_SEL, SEL_CODE64	/* multiboot's 32-bit code selector */
	.equ DEFAULT_TICKS, 100
	.equ PIC_VECTOR, 0x20		/* IRQ 0-7 -> 0x20-0x27, 8-15 -> 0x28-0x2f */
	.equ LAPIC_TIMER_VECTOR, 0x40
	.equ SPURIOUS_VECTOR, 0xff
	.equ PIC_EOI, 0x20
	.equ PIT_HZ, 1193182
	.equ PIT_DIVISOR, (PIT_HZ + 500) / 1000	/* 1000 Hz */
	.equ PIT_CMD, PORT_PIT + 3
	.equ PIT_CH0_MODE2, 0x34	/* channel 0, lo/hi byte, mode 2, binary */
	.equ LAPIC_EOI, LAPIC_ADDR + 0xb0
	.equ LAPIC_SVR, LAPIC_ADDR + 0xf0
	.equ LAPIC_LVT_TIMER, LAPIC_ADDR + 0x320
	.equ LAPIC_TIMER_INIT, LAPIC_ADDR + 0x380
	.equ LAPIC_TIMER_DIV, LAPIC_ADDR + 0x3e0
	.equ LVT_PERIODIC, 1 << 17
	.equ LVT_TSC_DEADLINE, 1 << 18
	.equ MSR_TSC_DEADLINE, 0x6e0
	.equ TSC_DELTA, 1000000		/* TSC cycles to the next deadline */
	.equ CPUID1_ECX_TSC_DEADLINE, 1 << 24
	.equ LVT_MASKED, 1 << 16
	.equ LAPIC_TICK_COUNT, 1000000	/* 1 ms at 1 GHz */
	.equ IER_RX, 0x01		/* interrupt on received data */
	.equ IOAPIC_IOWIN, IOAPIC_ADDR + 0x10
	.equ IOAPIC_EOI, IOAPIC_ADDR + 0x40
	.equ IOAPIC_REG_VERSION, 1
	.equ IOAPIC_REG_TABLE, 0x10	/* pin n: low half at 0x10 + 2n */
	.equ IOAPIC_LEVEL, 1 << 15
	.equ IOAPIC_MASKED, 1 << 16
	.equ IOAPIC_REMOTE_IRR, 1 << 14
	.equ IOAPIC_PIT_PIN, 2		/* IRQ 0, as the MADT's override says */
	.equ IOAPIC_PIT_VECTOR, 0x50
	.equ LEVEL_PIN, 10
	.equ LEVEL_VECTOR, 0x51
	.equ LEVEL_IRQS, 3
	.equ TESTDEV_IRQ_PORT, 0x2000
	.equ SPEAKER_GATE2, 0x01	/* port 0x61 */
	.equ SPEAKER_DATA, 0x02
	.equ SPEAKER_OUT2, 0x20
	.equ PIT_CH2_MODE0, 0xb0	/* counter 2, lo/hi byte, mode 0, binary */
	.equ PIT_CH2_LATCH, 0x80	/* counter 2, counter latch */
	.equ PIT_READBACK_STATUS2, 0xe8	/* read-back: status only, counter 2 */
	.equ PIT_STATUS_OUT, 0x80
	.equ PIT2_POLLS, 1000000	/* pc-testdev: line n follows port 0x2000 + n */
	.equ MCR_DTR_RTS_OUT2, 0x0b	/* OUT2 gates the UART IRQ on a PC */
	.equ VU_IDS, 0x4d561234		/* device 0x4d56, vendor 0x1234 */
	.equ VU_ID, 0x00		/* BAR0 registers (minivmm/vfio_user/sample.py) */
	.equ VU_COUNTER, 0x0c
	.equ VU_DMA_SRC, 0x10
	.equ VU_DMA_DST, 0x18
	.equ VU_DMA_LEN, 0x20
	.equ VU_DMA_CMD, 0x24
	.equ VU_DMA_STATUS, 0x28
	.equ VU_IRQ_STATUS, 0x2c
	.equ VU_IRQ_ACK, 0x34
	.equ VU_INTX_VECTOR, 0x53
	.equ VU_MODE_MSI, 0
	.equ VU_MODE_MSIX, 1
	.equ VU_MODE_INTX, 2
	.equ PCI_CAP_MSIX, 0x11
	.equ MSIX_ENABLE, 1 << 31	/* message control, in the capability's first dword */
	.equ MSIX_ENTRY_CONTROL, 12
	.equ VU_START_IRQ, 3		/* start, interrupt when done */
	.equ VU_IRQ_DMA, 1
	.equ VU_VECTOR, 0x52
	.equ VU_LEN, 256
	.equ VU_REPORT_EVERY, 100
	.equ MSI_ADDRESS, 0xfee00000	/* fixed delivery to APIC 0 */
	.equ PCI_CMD_MEM_MASTER, 0x6

/* IRET_SAME_CPL: what iret does when the interrupted code ran at our own
 * privilege level (CPL0, so CS does not change).  The stack holds EIP, CS,
 * EFLAGS: copy EFLAGS to the top (push with an ESP-based operand computes
 * the address before the push), pop it into EFLAGS (this restores IF), then
 * pop EIP and drop CS and EFLAGS.  An interrupt that arrives between popfl
 * and ret just nests on a consistent stack. */
#define IRET_SAME_CPL pushl 8(%esp); popfl; ret $8

	MULTIBOOT_HEADER

	.code32
	.text
	.globl _start
_start:
	mov $stack_top, %esp
	mov %ebx, %ebp			/* multiboot information */
	cld

	lgdt gdt_ptr			/* our own GDT: gates need a known CS */
	ljmp $CODE_SEL, $1f
1:	mov $SEL_DATA, %ax
	mov %ax, %ds
	mov %ax, %es
	mov %ax, %ss
	mov %ax, %fs
	mov %ax, %gs

	xor %eax, %eax			/* every vector: just return */
1:	mov $ignore_irq, %edx
	call set_gate
	inc %eax
	cmp $256, %eax
	jb 1b
	lidt idt_ptr

	call pic_init			/* all IRQs masked at vectors 0x20-0x2f */

	xor %esi, %esi			/* which test? */
	testl $MBI_FLAG_CMDLINE, MBI_FLAGS(%ebp)
	jz 1f
	mov MBI_CMDLINE(%ebp), %esi
1:	mov $word_oneshot, %edi
	call cmd_find
	test %eax, %eax
	jnz oneshot_test
	mov $word_tscdeadline, %edi
	call cmd_find
	test %eax, %eax
	jnz tscdeadline_test
	mov $word_lapic, %edi
	call cmd_find
	test %eax, %eax
	jnz lapic_test
	mov $word_serial, %edi
	call cmd_find
	test %eax, %eax
	jnz serial_test
	mov $word_ioapic, %edi
	call cmd_find
	test %eax, %eax
	jnz ioapic_test
	mov $word_pit2, %edi
	call cmd_find
	test %eax, %eax
	jnz pit2_test
	mov $word_vfiouser, %edi
	call cmd_find
	test %eax, %eax
	jnz vfiouser_test
	mov $word_pit, %edi
	call cmd_find			/* no "pit" either: rAX = 0, N = 100 */

/* ---- pit N ---- */
pit_test:
	call ticks_arg
	mov $PIC_VECTOR + IRQ_PIT, %eax
	mov $pit_irq, %edx
	call set_gate
	mov $PIT_CH0_MODE2, %al		/* rate generator, 1000 Hz */
	out %al, $PIT_CMD
	mov $PIT_DIVISOR & 0xff, %al
	out %al, $PORT_PIT
	mov $PIT_DIVISOR >> 8, %al
	out %al, $PORT_PIT
	mov $~(1 << IRQ_PIT) & 0xff, %al	/* unmask IRQ 0 only */
	out %al, $PORT_PIC_MASTER + 1
	call wait_ticks
	mov $0xff, %al			/* mask it again */
	out %al, $PORT_PIC_MASTER + 1
	PRINT("timer: pit ticks=")
	mov ticks, %eax
	call putdec
	PUTC('\n')
	jmp done

/* ---- lapic N ---- */
lapic_test:
	call ticks_arg
	mov $LAPIC_TIMER_VECTOR, %eax
	mov $lapic_irq, %edx
	call set_gate
	movl $0x100 | SPURIOUS_VECTOR, LAPIC_SVR	/* software enable */
	movl $0xb, LAPIC_TIMER_DIV	/* divide by 1 */
	movl $LVT_PERIODIC | LAPIC_TIMER_VECTOR, LAPIC_LVT_TIMER
	movl $LAPIC_TICK_COUNT, LAPIC_TIMER_INIT	/* starts the timer */
	call wait_ticks
	movl $LVT_MASKED, LAPIC_LVT_TIMER	/* stop it */
	movl $0, LAPIC_TIMER_INIT
	PRINT("timer: lapic ticks=")
	mov ticks, %eax
	call putdec
	PUTC('\n')
	jmp done

/* ---- oneshot N ---- */
oneshot_test:
	call ticks_arg
	mov $LAPIC_TIMER_VECTOR, %eax
	mov $oneshot_irq, %edx
	call set_gate
	movl $0x100 | SPURIOUS_VECTOR, LAPIC_SVR
	movl $0xb, LAPIC_TIMER_DIV
	movl $LAPIC_TIMER_VECTOR, LAPIC_LVT_TIMER	/* one-shot */
	movl $LAPIC_TICK_COUNT, LAPIC_TIMER_INIT
	call wait_ticks
	movl $LVT_MASKED, LAPIC_LVT_TIMER
	movl $0, LAPIC_TIMER_INIT
	PRINT("timer: oneshot ticks=")
	mov ticks, %eax
	call putdec
	PUTC('\n')
	jmp done

/* ---- tscdeadline N ---- */
tscdeadline_test:
	call ticks_arg
	mov $1, %eax
	cpuid
	test $CPUID1_ECX_TSC_DEADLINE, %ecx
	jnz 1f
	PRINT("timer: tscdeadline unsupported\n")
	jmp done
1:	mov $LAPIC_TIMER_VECTOR, %eax
	mov $tscdeadline_irq, %edx
	call set_gate
	movl $0x100 | SPURIOUS_VECTOR, LAPIC_SVR
	movl $LVT_TSC_DEADLINE | LAPIC_TIMER_VECTOR, LAPIC_LVT_TIMER
	call arm_deadline
	call wait_ticks
	movl $LVT_MASKED, LAPIC_LVT_TIMER
	xor %eax, %eax			/* disarm */
	xor %edx, %edx
	mov $MSR_TSC_DEADLINE, %ecx
	wrmsr
	PRINT("timer: tscdeadline ticks=")
	mov ticks, %eax
	call putdec
	PUTC('\n')
	jmp done

/* arm_deadline: IA32_TSC_DEADLINE = now + TSC_DELTA. */
arm_deadline:
	push %eax
	push %ecx
	push %edx
	rdtsc
	add $TSC_DELTA, %eax
	adc $0, %edx
	mov $MSR_TSC_DEADLINE, %ecx
	wrmsr
	pop %edx
	pop %ecx
	pop %eax
	ret

/* ---- serial ---- */
serial_test:
	mov $PIC_VECTOR + IRQ_COM1, %eax
	mov $serial_irq, %edx
	call set_gate
	mov $MCR_DTR_RTS_OUT2, %al
	mov $COM1_MCR, %dx
	out %al, %dx
	mov $IER_RX, %al
	mov $COM1_IER, %dx
	out %al, %dx
	mov $~(1 << IRQ_COM1) & 0xff, %al	/* unmask IRQ 4 only */
	out %al, $PORT_PIC_MASTER + 1
1:	sti				/* sti; hlt: no wake-up is lost */
	hlt
	cli
	cmpb $0, serial_done
	je 1b
	mov $0xff, %al
	out %al, $PORT_PIC_MASTER + 1
	xor %al, %al
	mov $COM1_IER, %dx
	out %al, %dx
	PRINT("timer: serial done\n")

done:
	mov $0x10, %al
	jmp guest_exit

/* ---- ioapic N ---- */
ioapic_test:
	call ticks_arg
	mov $word_eoi, %edi
	call cmd_find
	test %eax, %eax
	setnz directed_eoi
	movl $0x100 | SPURIOUS_VECTOR, LAPIC_SVR	/* software enable */
	movl $IOAPIC_REG_VERSION, IOAPIC_ADDR
	PRINT("timer: ioapic version=")
	mov IOAPIC_IOWIN, %eax
	mov $8, %ecx
	call puthex
	PUTC('\n')

	mov $IOAPIC_PIT_VECTOR, %eax
	mov $lapic_irq, %edx		/* counts and EOIs the LAPIC */
	call set_gate
	mov $IOAPIC_PIT_PIN, %ecx
	mov $IOAPIC_PIT_VECTOR, %eax	/* fixed, physical, to APIC 0, edge */
	call ioapic_route
	mov $PIT_CH0_MODE2, %al
	out %al, $PIT_CMD
	mov $PIT_DIVISOR & 0xff, %al
	out %al, $PORT_PIT
	mov $PIT_DIVISOR >> 8, %al
	out %al, $PORT_PIT
	call wait_ticks
	mov $IOAPIC_PIT_PIN, %ecx
	mov $IOAPIC_MASKED, %eax
	call ioapic_route
	PRINT("timer: ioapic pit ticks=")
	mov ticks, %eax
	call putdec
	PUTC('\n')

	mov $LEVEL_VECTOR, %eax
	mov $level_irq, %edx
	call set_gate
	mov $LEVEL_PIN, %ecx
	mov $LEVEL_VECTOR | IOAPIC_LEVEL, %eax
	call ioapic_route
	mov $1, %al			/* raise the line */
	mov $TESTDEV_IRQ_PORT + LEVEL_PIN, %dx
	out %al, %dx
1:	sti
	hlt
	cli
	cmpl $LEVEL_IRQS, level_irqs
	jb 1b
	call irq_window			/* room for an interrupt that should not come */
	PRINT("timer: ioapic level irqs=")
	mov level_irqs, %eax
	call putdec
	PRINT(" rirr=")
	movl $IOAPIC_REG_TABLE + 2 * LEVEL_PIN, IOAPIC_ADDR
	mov IOAPIC_IOWIN, %eax
	shr $14, %eax			/* IOAPIC_REMOTE_IRR */
	and $1, %eax
	call putdec
	PUTC('\n')
	jmp done

/* ---- pit2 ---- */
pit2_test:
	in $PORT_SPEAKER, %al
	and $~SPEAKER_DATA, %al		/* speaker off */
	or $SPEAKER_GATE2, %al		/* counter 2 counts */
	out %al, $PORT_SPEAKER
	mov $PIT_CH2_MODE0, %al
	out %al, $PIT_CMD
	mov $0xff, %al			/* count 0xffff, low byte first */
	out %al, $PORT_PIT + 2
	out %al, $PORT_PIT + 2
	call pit2_latch
	mov %eax, %ebx
	mov $2000, %ecx			/* let it run a little */
1:	loop 1b
	call pit2_latch
	PRINT("timer: pit2 down=")
	cmp %ebx, %eax
	setb %al
	movzbl %al, %eax
	call putdec
	mov $PIT_READBACK_STATUS2, %al
	out %al, $PIT_CMD
	in $PORT_PIT + 2, %al
	PRINT(" status=")
	movzbl %al, %eax
	and $~PIT_STATUS_OUT, %eax	/* the output may rise at any moment */
	mov $2, %ecx
	call puthex
	mov $PIT2_POLLS, %ecx		/* about 60 ms here, 55 ms of counting */
1:	in $PORT_SPEAKER, %al
	test $SPEAKER_OUT2, %al
	jnz 2f
	loop 1b
2:	PRINT(" out2=")
	shr $5, %eax
	and $1, %eax
	call putdec
	PUTC('\n')
	jmp done

/* pit2_latch: eax = counter 2's count, latched. */
pit2_latch:
	mov $PIT_CH2_LATCH, %al
	out %al, $PIT_CMD
	in $PORT_PIT + 2, %al
	movzbl %al, %edx
	in $PORT_PIT + 2, %al
	movzbl %al, %eax
	shl $8, %eax
	or %edx, %eax
	ret

/* irq_window: interrupts enabled for 20000 loop iterations, then disabled
 * again: room for an interrupt a test says must not come. */
irq_window:
	push %ecx
	mov $20000, %ecx
	sti
1:	loop 1b
	cli
	pop %ecx
	ret

/* ioapic_route: IOAPIC pin ecx's entry = eax (low half), destination APIC 0. */
ioapic_route:
	push %eax
	lea IOAPIC_REG_TABLE + 1(, %ecx, 2), %eax
	mov %eax, IOAPIC_ADDR
	movl $0, IOAPIC_IOWIN		/* high half: destination 0 */
	lea IOAPIC_REG_TABLE(, %ecx, 2), %eax
	mov %eax, IOAPIC_ADDR
	pop %eax
	mov %eax, IOAPIC_IOWIN
	ret

/* ticks_arg: eax = address after the command-line word, or 0.
 * Sets target = the number that follows it, or DEFAULT_TICKS. */
ticks_arg:
	push %esi
	mov %eax, %esi
	test %esi, %esi
	jz 1f
	call parse_dec
	test %eax, %eax
	jnz 2f
1:	mov $DEFAULT_TICKS, %eax
2:	mov %eax, target
	movl $0, ticks
	pop %esi
	ret

/* wait_ticks: sleep until the interrupt handler has counted target ticks. */
wait_ticks:
	push %eax
1:	sti				/* the instruction after sti runs */
	hlt				/* before any interrupt: no lost wake-up */
	cli
	mov ticks, %eax
	cmp target, %eax
	jb 1b
	pop %eax
	ret

/* pic_init: program both 8259s (ICW1-ICW4): IRQ 0-7 at vectors 0x20-0x27,
 * IRQ 8-15 at 0x28-0x2f, slave on IRQ 2, 8086 mode; mask every IRQ. */
pic_init:
	mov $0x11, %al			/* ICW1: edge, cascade, ICW4 follows */
	out %al, $PORT_PIC_MASTER
	out %al, $PORT_PIC_SLAVE
	mov $PIC_VECTOR, %al		/* ICW2: vector base */
	out %al, $PORT_PIC_MASTER + 1
	mov $PIC_VECTOR + 8, %al
	out %al, $PORT_PIC_SLAVE + 1
	mov $1 << 2, %al		/* ICW3: slave on IRQ 2 ... */
	out %al, $PORT_PIC_MASTER + 1
	mov $2, %al			/* ... which is its cascade identity */
	out %al, $PORT_PIC_SLAVE + 1
	mov $0x01, %al			/* ICW4: 8086 mode, normal EOI */
	out %al, $PORT_PIC_MASTER + 1
	out %al, $PORT_PIC_SLAVE + 1
	mov $0xff, %al			/* OCW1: mask everything */
	out %al, $PORT_PIC_MASTER + 1
	out %al, $PORT_PIC_SLAVE + 1
	ret

/* ---- vfiouser N ---- */
vfiouser_test:
	call ticks_arg			/* target = N rounds; ticks counts interrupts */
	mov $word_msix, %edi
	call cmd_find
	test %eax, %eax
	jz 1f
	movb $VU_MODE_MSIX, vu_mode
1:	mov $word_intx, %edi
	call cmd_find
	test %eax, %eax
	jz 1f
	movb $VU_MODE_INTX, vu_mode
1:
	xor %ebx, %ebx			/* find the device: slot in ebx */
1:	mov %ebx, %ecx
	shl $11, %ecx
	call vu_cfg_read		/* register 0 of slot ebx */
	cmp $VU_IDS, %eax
	je 2f
	inc %ebx
	cmp $32, %ebx
	jb 1b
	PRINT("timer: vfiouser no device\n")
	jmp done
2:	shl $11, %ebx
	mov %ebx, vu_slot
	lea 0x10(%ebx), %ecx		/* BAR0 */
	call vu_cfg_read
	and $~0xf, %eax
	mov %eax, %edi			/* edi = BAR0 from here on */
	mov %eax, vu_bar0
	lea 0x04(%ebx), %ecx		/* command: memory decoding, bus mastering */
	call vu_cfg_read
	or $PCI_CMD_MEM_MASTER, %eax
	call vu_cfg_write
	PRINT("timer: vfiouser id=")
	mov VU_ID(%edi), %eax
	mov $8, %ecx
	call puthex
	PUTC('\n')
	movl $0x100 | SPURIOUS_VECTOR, LAPIC_SVR	/* software enable */
	cmpb $VU_MODE_MSIX, vu_mode
	je vu_msix
	cmpb $VU_MODE_INTX, vu_mode
	je vu_intx

	mov $0x05, %eax			/* the MSI capability */
	call vu_find_cap
	test %ecx, %ecx
	jz 9f
	call vu_cfg_read
	mov %eax, %edx			/* id, next, message control */
	lea 4(%ecx), %ecx
	mov $MSI_ADDRESS, %eax
	call vu_cfg_write
	add $4, %ecx
	bt $23, %edx			/* 64-bit address capable: the upper half, then the data */
	jnc 5f
	xor %eax, %eax
	call vu_cfg_write
	add $4, %ecx
5:	mov $VU_VECTOR, %eax		/* fixed, edge */
	call vu_cfg_write
	mov $0x05, %eax
	call vu_find_cap
	mov %edx, %eax
	or $1 << 16, %eax		/* MSI enable */
	call vu_cfg_write
	mov $VU_VECTOR, %eax
	mov $vu_irq, %edx
	call set_gate

vu_rounds:
	xor %esi, %esi			/* esi = round */
6:	cmp target, %esi
	jae 8f
	call vu_start_round
	lea 1(%esi), %eax		/* until this round's interrupt */
1:	cmp ticks, %eax
	jbe 2f
	sti
	hlt
	cli
	jmp 1b
2:	mov VU_DMA_STATUS(%edi), %edx
	test %edx, %edx
	jnz 7f
	push %esi			/* the copy must match */
	push %edi
	mov $vu_src, %esi
	mov $vu_dst, %edi
	mov $VU_LEN / 4, %ecx
	repe cmpsl
	pop %edi
	pop %esi
	jne 7f
	inc %esi
	mov %esi, %eax
	xor %edx, %edx
	mov $VU_REPORT_EVERY, %ecx
	div %ecx
	test %edx, %edx
	jnz 6b
	PRINT("timer: vfiouser round=")
	mov %esi, %eax
	call putdec
	PUTC('\n')
	jmp 6b
7:	PRINT("timer: vfiouser bad round=")
	mov %esi, %eax
	call putdec
	PRINT(" status=")
	mov VU_DMA_STATUS(%edi), %eax
	call putdec
	PUTC('\n')
	jmp done
8:	PRINT("timer: vfiouser rounds=")
	mov %esi, %eax
	call putdec
	PRINT(" irqs=")
	mov ticks, %eax
	call putdec
	PRINT(" counter=")
	mov VU_COUNTER(%edi), %eax
	call putdec
	PUTC('\n')
	jmp done
9:	PRINT("timer: vfiouser no MSI\n")
	jmp done

vu_msix:				/* MSI-X vector 0: its table entry, then enable */
	mov $PCI_CAP_MSIX, %eax
	call vu_find_cap
	test %ecx, %ecx
	jz 9f
	add $4, %ecx			/* the table: offset and BIR */
	call vu_bar_offset
	mov %eax, vu_msix_table
	add $4, %ecx			/* the pending bits: offset and BIR */
	call vu_bar_offset
	mov %eax, vu_msix_pba
	mov vu_msix_table, %edx
	movl $MSI_ADDRESS, (%edx)
	movl $0, 4(%edx)
	movl $VU_VECTOR, 8(%edx)	/* fixed, edge */
	movl $0, MSIX_ENTRY_CONTROL(%edx)	/* unmasked, as a driver sets it up */
	sub $8, %ecx
	call vu_cfg_read
	or $MSIX_ENABLE, %eax
	call vu_cfg_write
	movl $1, MSIX_ENTRY_CONTROL(%edx)	/* then masked, as drivers mask */
	mov $VU_VECTOR, %eax
	mov $vu_irq, %edx
	call set_gate
	xor %esi, %esi
	call vu_start_round		/* round 0's transfer, its vector masked */
1:	mov VU_COUNTER(%edi), %eax	/* until the device has done it */
	test %eax, %eax
	jz 1b
	call irq_window			/* room for an interrupt that must not come */
	PRINT("timer: vfiouser msix pending=")
	mov vu_msix_pba, %eax
	mov (%eax), %eax
	and $1, %eax
	call putdec
	PRINT(" early=")
	mov ticks, %eax
	call putdec
	mov vu_msix_table, %edx		/* unmask: the pending interrupt comes */
	movl $0, MSIX_ENTRY_CONTROL(%edx)
3:	cmpl $0, ticks
	jne 4f
	sti
	hlt
	cli
	jmp 3b
4:	PRINT(" delivered=")
	mov ticks, %eax
	call putdec
	PUTC('\n')
	movl $0, ticks
	jmp vu_rounds
9:	PRINT("timer: vfiouser no MSI-X\n")
	jmp done

vu_intx:				/* INTx: the IOAPIC pin of the interrupt line */
	lea 0x3c(%ebx), %ecx
	call vu_cfg_read		/* line (bits 0-7), pin (8-15) */
	test $0xff00, %eax
	jz 9f
	movzbl %al, %ecx
	mov $VU_INTX_VECTOR | IOAPIC_LEVEL, %eax
	call ioapic_route
	mov $VU_INTX_VECTOR, %eax
	mov $vu_intx_irq, %edx
	call set_gate
	PRINT("timer: vfiouser intx line=")
	mov %ecx, %eax
	call putdec
	PUTC('\n')
	jmp vu_rounds
9:	PRINT("timer: vfiouser no INTx\n")
	jmp done

/* vu_start_round: round esi's transfer, started on the device (BAR0 at
 * edi): VU_LEN bytes of (round << 16 | index) to a cleared buffer, with an
 * interrupt at its end. */
vu_start_round:
	push %eax
	push %ecx
	push %edi
	mov $vu_src, %edi
	mov %esi, %eax
	shl $16, %eax
	mov $VU_LEN / 4, %ecx
1:	stosl
	inc %eax
	loop 1b
	mov $vu_dst, %edi
	xor %eax, %eax
	mov $VU_LEN / 4, %ecx
	rep stosl
	pop %edi
	movl $vu_src, VU_DMA_SRC(%edi)
	movl $0, VU_DMA_SRC + 4(%edi)
	movl $vu_dst, VU_DMA_DST(%edi)
	movl $0, VU_DMA_DST + 4(%edi)
	movl $VU_LEN, VU_DMA_LEN(%edi)
	movl $VU_START_IRQ, VU_DMA_CMD(%edi)
	pop %ecx
	pop %eax
	ret

/* vu_find_cap: ecx = configuration address of capability eax of the
 * device (vu_slot), or 0. */
vu_find_cap:
	push %eax
	push %edx
	mov %eax, %edx
	mov vu_slot, %ecx
	add $0x34, %ecx
	call vu_cfg_read
	movzbl %al, %eax
1:	test %eax, %eax
	jz 8f
	mov vu_slot, %ecx
	add %eax, %ecx
	call vu_cfg_read
	cmp %dl, %al
	je 9f
	movzbl %ah, %eax
	jmp 1b
8:	xor %ecx, %ecx
9:	pop %edx
	pop %eax
	ret

/* vu_bar_offset: eax = the address the dword at configuration address ecx
 * (an offset with a BAR index in its low 3 bits) names: that BAR's low
 * half (below 4 GiB, where firmware put it) plus the offset. */
vu_bar_offset:
	push %ecx
	push %edx
	call vu_cfg_read
	mov %eax, %edx
	and $7, %eax
	mov vu_slot, %ecx
	lea 0x10(%ecx, %eax, 4), %ecx
	call vu_cfg_read
	and $~0xf, %eax
	and $~7, %edx
	add %edx, %eax
	pop %edx
	pop %ecx
	ret

/* vu_cfg_read: eax = the dword at configuration address ecx (slot << 11 | register). */
vu_cfg_read:
	push %edx
	mov %ecx, %eax
	or $0x80000000, %eax
	mov $PORT_PCI_CONFIG, %dx
	out %eax, %dx
	add $4, %dx
	in %dx, %eax
	pop %edx
	ret

/* vu_cfg_write: the dword at configuration address ecx = eax. */
vu_cfg_write:
	push %edx
	push %eax
	mov %ecx, %eax
	or $0x80000000, %eax
	mov $PORT_PCI_CONFIG, %dx
	out %eax, %dx
	pop %eax
	add $4, %dx
	out %eax, %dx
	pop %edx
	ret

/* set_gate: IDT entry eax -> handler edx (32-bit interrupt gate, DPL 0). */
set_gate:
	push %ecx
	mov %edx, %ecx
	and $0xffff, %ecx		/* offset 15:0 */
	or $CODE_SEL << 16, %ecx	/* selector */
	mov %ecx, idt(, %eax, 8)
	mov %edx, %ecx
	and $0xffff0000, %ecx		/* offset 31:16 */
	or $0x8e00, %ecx		/* present, DPL 0, 32-bit interrupt gate */
	mov %ecx, idt + 4(, %eax, 8)
	pop %ecx
	ret

/* ---- interrupt handlers ---- */
ignore_irq:				/* spurious interrupts need no EOI */
	IRET_SAME_CPL

pit_irq:
	push %eax
	incl ticks
	mov $PIC_EOI, %al
	out %al, $PORT_PIC_MASTER
	pop %eax
	IRET_SAME_CPL

lapic_irq:
	incl ticks
	movl $0, LAPIC_EOI
	IRET_SAME_CPL

oneshot_irq:				/* re-armed until the test masks it */
	incl ticks
	movl $LAPIC_TICK_COUNT, LAPIC_TIMER_INIT
	movl $0, LAPIC_EOI
	IRET_SAME_CPL

tscdeadline_irq:
	incl ticks
	call arm_deadline
	movl $0, LAPIC_EOI
	IRET_SAME_CPL

level_irq:				/* lower the line on the last one, then EOI */
	push %eax
	push %edx
	incl level_irqs
	cmpl $LEVEL_IRQS, level_irqs
	jb 1f
	xor %al, %al
	mov $TESTDEV_IRQ_PORT + LEVEL_PIN, %dx
	out %al, %dx
1:	movl $0, LAPIC_EOI
	cmpb $0, directed_eoi
	je 2f
	movl $LEVEL_VECTOR, IOAPIC_EOI
2:	pop %edx
	pop %eax
	IRET_SAME_CPL

vu_intx_irq:				/* a transfer's end only: acknowledge, count; EOI */
	push %eax
	push %edx
	mov vu_bar0, %eax
	mov VU_IRQ_STATUS(%eax), %edx
	test $VU_IRQ_DMA, %edx
	jz 1f
	movl $VU_IRQ_DMA, VU_IRQ_ACK(%eax)
	incl ticks
1:	movl $0, LAPIC_EOI
	pop %edx
	pop %eax
	IRET_SAME_CPL

vu_irq:					/* count, acknowledge the device, EOI */
	push %eax
	incl ticks
	mov vu_bar0, %eax
	movl $VU_IRQ_DMA, VU_IRQ_ACK(%eax)
	movl $0, LAPIC_EOI
	pop %eax
	IRET_SAME_CPL

serial_irq:
	pushal
1:	mov $COM1_LSR, %dx		/* every byte that is there */
	in %dx, %al
	test $LSR_DATA_READY, %al
	jz 2f
	mov $COM1_DATA, %dx
	in %dx, %al
	mov %al, %bl
	PRINT("timer: got ")
	call putc
	PUTC('\n')
	cmp $'q', %bl
	jne 1b
	movb $1, serial_done
	jmp 1b
2:	mov $PIC_EOI, %al
	out %al, $PORT_PIC_MASTER
	popal
	IRET_SAME_CPL

#include "serial.S"
#include "cmdline.S"

	.section .rodata
word_pit:	.asciz "pit"
word_lapic:	.asciz "lapic"
word_oneshot:	.asciz "oneshot"
word_tscdeadline:	.asciz "tscdeadline"
word_serial:	.asciz "serial"
word_ioapic:	.asciz "ioapic"
word_pit2:	.asciz "pit2"
word_eoi:	.asciz "eoi"
word_vfiouser:	.asciz "vfiouser"
word_msix:	.asciz "msix"
word_intx:	.asciz "intx"
	.balign 8
gdt:
	.quad 0				/* 0x00 null */
	.quad 0				/* 0x08 unused */
	.quad 0x00cf9b000000ffff	/* 0x10 = CODE_SEL: 32-bit code, flat */
	.quad 0x00cf93000000ffff	/* 0x18 = SEL_DATA: data, flat */
gdt_end:
	.balign 4
	.word 0				/* so that the base is 4-aligned */
gdt_ptr:
	.word gdt_end - gdt - 1
	.long gdt
idt_ptr:
	.word 256 * 8 - 1
	.long idt

	.data
ticks:		.long 0
target:		.long 0
level_irqs:	.long 0
directed_eoi:	.byte 0
serial_done:	.byte 0
	.balign 4
vu_slot:	.long 0
vu_bar0:	.long 0
vu_msix_table:	.long 0
vu_msix_pba:	.long 0
vu_mode:	.byte VU_MODE_MSI

	.bss
	.balign 16
vu_src:	.space VU_LEN
vu_dst:	.space VU_LEN

	.balign 8
idt:	.space 256 * 8
	.balign 16
	.space 4096
stack_top:
