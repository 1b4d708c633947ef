"""Every fixed guest-physical address and port of the minivmm PC machine.

One place for each fact: the VMM, the boot loaders and the shipped guests
(guests/build.py turns this module into an assembler include) all read these.

Low memory as the VMM fills it before the first instruction::

    0x000500  boot GDT (GDT_ENTRIES descriptors)
    0x001000  boot stack, grows down from BOOT_STACK_TOP (ELF64 and Linux boot)
    0x007000  Linux zero page (boot_params) for a bzImage
    0x008000  PVH start info, then its memory map and module list (PVH boot)
    0x009000  PML4, then PDPT, then 2 MiB page directories (ELF64 and 64-bit Linux boot)
    0x020000  kernel command line (CMDLINE_MAX bytes; the Linux and PVH boots)
    0x021000  free for the guest, up to the EBDA
    0x09fc00  EBDA: MP floating pointer
    0x0a0000  legacy VGA/ROM hole (with -bios: its last 128 KiB at 0xe0000)
    0x0e0000  ACPI RSDP, then the ACPI tables up to 0xf0000 (direct kernel boot)
    0x0f0000  MP configuration table (in the reserved BIOS area)
    0x100000  kernels usually load here; after the kernel and its modules (page
              aligned), the multiboot information with its memory map, command
              line, module list and strings, as QEMU's loader places them.
              A bzImage goes at its pref_address when relocatable and in RAM;
              a Linux initrd at the top of RAM below 4 GiB (and initrd_addr_max)
"""

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
PAGE_SIZE = 4 * KiB

# --- boot structures in low RAM -------------------------------------------
GDT_ADDR = 0x500
BOOT_STACK_TOP = 0x7000
BOOT_PARAMS_ADDR = 0x7000  # the Linux zero page: one page, above the boot stack
PVH_START_INFO_ADDR = 0x8000  # hvm_start_info, its memory map and module list: one page
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000
PD_AREA_END = 0x20000  # PDs for 2 MiB pages fit below here: 21 GiB mapped
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 4096
GUEST_FREE_LOW = 0x21000  # first byte the VMM never writes below 1 MiB
EBDA_ADDR = 0x9FC00
MP_FLOATING_ADDR = EBDA_ADDR
MP_CONFIG_ADDR = 0xF0000  # the BIOS area: room for a table of MP_MAX_CPUS
MP_CONFIG_END = 0x100000
MP_MAX_CPUS = 254  # 8-bit APIC ids, 0xff is broadcast, and the IOAPIC takes the id after the CPUs
# ACPI: the RSDP where guests scan for it (16-byte aligned in 0xe0000-0xfffff: Linux, kvm-unit-tests),
# the tables after it, below the MP table; room for MP_MAX_CPUS (arch/x86/acpi.py checks the end).
ACPI_RSDP_ADDR = 0xE0000
ACPI_TABLES_ADDR = 0xE0040  # the FACS first: it must be 64-byte aligned
ACPI_TABLES_END = MP_CONFIG_ADDR
LOW_RAM_END = 0xA0000  # end of conventional memory (640 KiB)
BIOS_ALIAS_END = 0x100000
BIOS_ALIAS_MAX = 128 * KiB  # the "isa-bios" alias below 1 MiB
HIGH_RAM_START = 1 * MiB
KERNEL_LOAD_ADDR = 1 * MiB

# --- boot GDT selectors (the Linux boot protocol's, crosvm's layout) -------
SEL_CODE64 = 0x10  # ELF64 boot: 64-bit code; multiboot: 32-bit code
SEL_DATA = 0x18
SEL_TSS = 0x20

# --- 32-bit MMIO hole and top-of-4G addresses ------------------------------
FOUR_GIB = 4 * GiB
# RAM of at least this size is split around the hole (QEMU's pc machine,
# gigabyte-aligned): 3 GiB below 4 GiB, the rest from 4 GiB up.
RAM_SPLIT_THRESHOLD = 0xE0000000
RAM_BELOW_4G_WHEN_SPLIT = 0xC0000000
MMIO_HOLE_START = RAM_BELOW_4G_WHEN_SPLIT
# q35: PCI Express enhanced configuration (ECAM, "MMCONFIG") where QEMU's MCH puts
# it (PCIEXBAR's default), 1 MiB per bus for buses 0-255. RAM that would reach it
# is split instead: 2 GiB below 4 GiB, the rest from 4 GiB up (QEMU's q35).
PCIE_ECAM_BASE = 0xB0000000
PCIE_ECAM_SIZE = 256 * MiB
Q35_RAM_SPLIT_THRESHOLD = PCIE_ECAM_BASE
Q35_RAM_BELOW_4G_WHEN_SPLIT = 0x80000000
PCI_MMIO_BASE = 0xE0000000  # memory BARs, in the 32-bit hole below the IOAPIC
PCI_MMIO_END = 0xFEC00000
IOAPIC_ADDR = 0xFEC00000
IOAPIC_SIZE = 0x1000
IOMMU_ADDR = 0xFED90000  # q35's VT-d remapping unit, -device intel-iommu (QEMU's Q35_HOST_BRIDGE_IOMMU_ADDR)
IOMMU_SIZE = 0x1000
LAPIC_ADDR = 0xFEE00000
IDENTITY_MAP_ADDR = 0xFFFBC000  # one page, for KVM_SET_IDENTITY_MAP_ADDR
TSS_ADDR = 0xFFFBD000  # three pages, for KVM_SET_TSS_ADDR
BIOS_MAX_SIZE = 16 * MiB  # -bios images end at 4 GiB; bounded below the TSS

# --- x86 reset vector ---------------------------------------------------------
RESET_VECTOR = 0xFFFFFFF0

# --- legacy I/O ports ----------------------------------------------------------
PORT_PIC_MASTER = 0x20
PORT_PIC_SLAVE = 0xA0
PORT_PIT = 0x40
PORT_SPEAKER = 0x61  # PIT counter 2's gate and output, the speaker enable
PORT_I8042_DATA = 0x60
PORT_I8042_CMD = 0x64
PORT_CMOS = 0x70  # index at 0x70, data at 0x71
PORT_POST = 0x80  # boot-phase marker (POST code)
PORT_ELCR = 0x4D0  # the PICs' edge/level control registers (master, slave)
PORT_A20 = 0x92  # "fast A20" / system control port A
PORT_DEBUG_EXIT_DEFAULT = 0x501  # QEMU's isa-debug-exit default iobase
PORT_ACPI_PM1A_EVT = 0x600  # QEMU's PIIX4 PM block: PM1a status/enable (4 bytes)
PORT_ACPI_PM1A_CNT = 0x604  # QEMU's PM1a control: outw 0x2000 powers off
PORT_ACPI_PM_TMR = 0x608  # the ACPI PM timer (4 bytes)
PORT_PCI_CONFIG = 0xCF8  # PCI configuration mechanism #1: address at 0xcf8 (32-bit), data at 0xcfc-0xcff
PORT_RESET_CONTROL = 0xCF9  # PIIX reset control: the FADT's reset register
PCI_IO_BASE = 0xC000  # I/O BARs, as firmware assigns them
PCI_IO_END = 0x10000
PORT_FW_CFG = 0x510  # QEMU's fw_cfg: selector (16-bit write) at 0x510, data (8-bit read) at 0x511
PORT_FW_CFG_DMA = 0x514  # fw_cfg DMA address, big-endian: high half at 0x514, low half at 0x518
FW_CFG_PORTS_SIZE = 12  # 0x510-0x51b
PORT_COM1 = 0x3F8
COM_PORTS = ((PORT_COM1, 4), (0x2F8, 3), (0x3E8, 4), (0x2E8, 3))  # (base port, IRQ) of COM1-COM4
IRQ_COM1 = 4
IRQ_PIT = 0

# --- multiboot v1 -----------------------------------------------------------
MULTIBOOT_HEADER_MAGIC = 0x1BADB002
MULTIBOOT_BOOTLOADER_MAGIC = 0x2BADB002
MULTIBOOT_SEARCH = 8192
