//! GDT with a 64-bit code and data segment and the TSS, whose interrupt stack table gives
//! every exception and interrupt a known-good stack (Intel SDM Vol. 3A 6.14.5). The
//! precompiled `core` uses the red zone, so nothing may be pushed onto an interrupted stack.

use core::arch::asm;
use core::mem::size_of;
use static_assertions::const_assert_eq;

pub const KERNEL_CS: u16 = 0x08;
pub const KERNEL_DS: u16 = 0x10;
pub const TSS_SEL: u16 = 0x18;

/// IST slots (1-based as in the IDT gate).
pub const IST_EXCEPTION: u8 = 1;
pub const IST_NMI: u8 = 2;
pub const IST_DOUBLE_FAULT: u8 = 3;
pub const IST_MACHINE_CHECK: u8 = 4;
pub const IST_INTERRUPT: u8 = 5;
const IST_COUNT: usize = 5;
const IST_STACK_SIZE: usize = 32 * 1024;

/// 64-bit TSS (Intel SDM Vol. 3A 8.7, figure 8-11).
#[repr(C, packed(4))]
pub struct Tss {
    _reserved0: u32,
    rsp: [u64; 3],
    _reserved1: u64,
    ist: [u64; 7],
    _reserved2: u64,
    _reserved3: u16,
    iomap_base: u16,
}
const_assert_eq!(size_of::<Tss>(), 104);

#[repr(C, align(16))]
struct Stacks([[u8; IST_STACK_SIZE]; IST_COUNT]);

/// One CPU's descriptor tables: its GDT, its TSS and the IST stacks the TSS names. Every
/// CPU has its own (a TSS is busy while loaded, and two CPUs may not share IST stacks).
#[repr(C, align(16))]
pub struct CpuTables {
    gdt: [u64; 5],
    tss: Tss,
    stacks: Stacks,
}

/// The boot CPU's tables (the APs' are allocated when they start, see `CpuTables::new`).
static mut BSP_TABLES: CpuTables = CpuTables {
    gdt: [0; 5],
    tss: Tss { _reserved0: 0, rsp: [0; 3], _reserved1: 0, ist: [0; 7], _reserved2: 0, _reserved3: 0, iomap_base: 0 },
    stacks: Stacks([[0; IST_STACK_SIZE]; IST_COUNT]),
};

#[repr(C, packed)]
struct Pointer {
    limit: u16,
    base: u64,
}

impl CpuTables {
    /// Zeroed tables on the heap, for an application processor; `load` fills them.
    pub fn new() -> alloc::boxed::Box<CpuTables> {
        // SAFETY: all-zero bytes are a valid CpuTables (integers and byte arrays only).
        unsafe { alloc::boxed::Box::<CpuTables>::new_zeroed().assume_init() }
    }

    /// Fills the GDT (code, data, this TSS) and the TSS (one IST stack per slot), then loads
    /// them on this CPU: GDTR, the segment registers, TR.
    ///
    /// # Safety
    /// Call once per `CpuTables`, on the CPU that will own them for the rest of the run,
    /// before that CPU enables interrupts; nothing else may use these tables.
    pub unsafe fn load(tables: *mut CpuTables) {
        // SAFETY: the caller gives us sole use of `tables`, which lives for the rest of the run.
        unsafe {
            let t = &mut *tables;
            for i in 0..IST_COUNT {
                t.tss.ist[i] = t.stacks.0[i].as_ptr() as u64 + IST_STACK_SIZE as u64;
            }
            t.tss.iomap_base = size_of::<Tss>() as u16;
            let base = (&raw const t.tss) as u64;
            let limit = (size_of::<Tss>() - 1) as u64;
            t.gdt[0] = 0;
            t.gdt[1] = 0x00af_9a00_0000_ffff; // 64-bit code
            t.gdt[2] = 0x00cf_9200_0000_ffff; // data
            // Available 64-bit TSS descriptor, 16 bytes (Intel SDM Vol. 3A 8.2.3).
            t.gdt[3] = (limit & 0xffff)
                | ((base & 0xff_ffff) << 16)
                | (0x89 << 40)
                | (((limit >> 16) & 0xf) << 48)
                | (((base >> 24) & 0xff) << 56);
            t.gdt[4] = base >> 32;
            let ptr = Pointer { limit: (size_of::<[u64; 5]>() - 1) as u16, base: t.gdt.as_ptr() as u64 };
            asm!(
                "lgdt [{ptr}]",
                "push {cs}",
                "lea {tmp}, [rip + 2f]",
                "push {tmp}",
                "retfq",
                "2:",
                "mov ds, {ds:x}",
                "mov es, {ds:x}",
                "mov ss, {ds:x}",
                "ltr {tss:x}",
                ptr = in(reg) &ptr,
                cs = in(reg) KERNEL_CS as u64,
                ds = in(reg) KERNEL_DS as u64,
                tss = in(reg) TSS_SEL as u64,
                tmp = out(reg) _,
            );
        }
    }
}

/// Base of this CPU's GDT, from GDTR (the VMX host state needs it).
pub fn gdt_base() -> u64 {
    let mut gdtr = [0u8; 10];
    // SAFETY: SGDT stores 10 bytes into the buffer.
    unsafe { asm!("sgdt [{}]", in(reg) gdtr.as_mut_ptr(), options(nostack)) };
    u64::from_le_bytes([gdtr[2], gdtr[3], gdtr[4], gdtr[5], gdtr[6], gdtr[7], gdtr[8], gdtr[9]])
}

/// Base of this CPU's TSS, read back from the TSS descriptor in this CPU's GDT (the VMX
/// host state needs it; each CPU has its own).
pub fn tss_base() -> u64 {
    let gdt = gdt_base() as *const u64;
    // SAFETY: GDTR names this CPU's live GDT (loaded by `CpuTables::load`), whose entries
    // 3 and 4 are the 16-byte TSS descriptor.
    let (low, high) = unsafe { (gdt.add(TSS_SEL as usize / 8).read(), gdt.add(TSS_SEL as usize / 8 + 1).read()) };
    ((low >> 16) & 0xff_ffff) | (((low >> 56) & 0xff) << 24) | (high << 32)
}

/// Loads the boot CPU's GDT, segment registers and task register. Call once, on the boot
/// CPU, before interrupts or exceptions can happen.
pub fn init() {
    // SAFETY: runs once on the boot CPU before anything else uses BSP_TABLES.
    unsafe { CpuTables::load(&raw mut BSP_TABLES) }
}
