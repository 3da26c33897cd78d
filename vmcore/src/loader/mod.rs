//! Loading a guest: its RAM mapped in 2 MiB frames, the ELF image's segments copied in, the
//! guest's own identity page tables and the boot information written, and the initial vCPU
//! state that goes with them. Host-tested over a simulated machine (`tests.rs`); the
//! hypervisor's `vm/loader.rs` adds the debugger record and its `VcpuSetup`.

use crate::memory::{DataMem, GuestMemory, MapError};
use formats::elf;
use morsel::{Format, FrameAlloc, GuestPhysAddr};

#[cfg(test)]
mod tests;

const GIB: u64 = 1 << 30;
const TWO_MIB: u64 = 2 << 20;

/// What the loader needs to know about the guest.
pub struct Load<'a> {
    pub id: u32,
    pub name: &'a str,
    pub memory: u64,
    pub arg: u64,
    pub vcpus: u32,
    /// The log level the guest library starts with (`BootInfo::log_level`).
    pub log_level: u64,
}

/// The first vCPU's start: at the image's entry, the stack at the top of guest memory,
/// rdi = the boot information, CR3 = the loader's page tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Start {
    pub rip: u64,
    pub rsp: u64,
    pub rdi: u64,
    pub cr3: u64,
}

/// Maps the guest's RAM into `mem` and loads `image` (already checked to lie inside it,
/// `elf::Image::parse`): its segments (their zero-filled ends are fresh RAM, zero already),
/// the page tables (`write_page_tables`) and the boot information at `abi::BOOT_INFO_GPA`.
pub fn load<F: Format<Input = GuestPhysAddr>, M: DataMem>(
    mem: &mut GuestMemory<F, M>,
    image: &elf::Image,
    g: &Load,
    alloc: &impl FrameAlloc,
) -> Result<Start, MapError> {
    mem.map_ram(g.memory, alloc)?;
    // Inside guest RAM (checked by elf::Image::parse), which is all read-write: cannot fail.
    for seg in image.segments() {
        let _ = mem.write(GuestPhysAddr::new(seg.addr), seg.file);
    }
    write_page_tables(mem, g.memory, g.vcpus);
    let mut name = [0u8; 32];
    let n = g.name.len().min(31);
    name[..n].copy_from_slice(&g.name.as_bytes()[..n]);
    let info = abi::BootInfo {
        abi_version: abi::ABI_VERSION,
        guest_id: g.id as u64,
        memory_size: g.memory,
        morsel_window: abi::MORSEL_WINDOW_GPA,
        morsel_window_size: abi::MORSEL_WINDOW_SIZE,
        arg: g.arg,
        log_level: g.log_level,
        name,
        vcpu_count: g.vcpus as u64,
    };
    // SAFETY: BootInfo is plain old data without padding (u64s and a byte array).
    let bytes = unsafe { core::slice::from_raw_parts((&raw const info).cast::<u8>(), size_of::<abi::BootInfo>()) };
    let _ = mem.write(GuestPhysAddr::new(abi::BOOT_INFO_GPA), bytes);
    Ok(Start { rip: image.entry, rsp: g.memory, rdi: abi::BOOT_INFO_GPA, cr3: abi::PAGE_TABLES_GPA })
}

/// The guest's own page tables: an identity map of guest-physical [0, 4 TiB) with 1 GiB
/// pages: PML4 slot 0 covers guest RAM (and beyond, where the second-level table faults),
/// slots 1-7 the morsel window; but the GiB that holds the top of RAM is mapped in 2 MiB
/// pages, and RAM's last 2 MiB (where the vCPUs' stacks are) in 4 KiB pages, with each
/// vCPU's stack guard page (`stack_guard`) left out. Eleven pages at `PAGE_TABLES_GPA`,
/// inside guest RAM: the PML4, a table of 1 GiB pages per PML4 slot, the 2 MiB table, the
/// 4 KiB table.
fn write_page_tables<F: Format<Input = GuestPhysAddr>, M: DataMem>(mem: &mut GuestMemory<F, M>, memory: u64, vcpus: u32) {
    let pml4 = abi::PAGE_TABLES_GPA;
    let slots = 1 + (abi::MORSEL_WINDOW_SIZE / (512 * GIB));
    let pd = pml4 + 0x1000 * (slots + 1);
    let pt = pd + 0x1000;
    // RAM is a multiple of 2 MiB, at least 4 MiB and at most 512 GiB (`check_memory`):
    // its last 2 MiB lie in one GiB, inside PML4 slot 0.
    let last = memory - TWO_MIB;
    let mut page = [0u64; 512];
    for slot in 0..slots {
        page[slot as usize] = (pml4 + 0x1000 * (slot + 1)) | 0x3; // present, writable
    }
    let _ = mem.write(GuestPhysAddr::new(pml4), as_bytes(&page));
    for slot in 0..slots {
        for (j, e) in page.iter_mut().enumerate() {
            *e = ((slot * 512 + j as u64) * GIB) | 0x83; // present, writable, 1 GiB page
        }
        if slot == 0 {
            page[(last / GIB) as usize] = pd | 0x3;
        }
        let _ = mem.write(GuestPhysAddr::new(pml4 + 0x1000 * (slot + 1)), as_bytes(&page));
    }
    let gib = last / GIB * GIB;
    for (j, e) in page.iter_mut().enumerate() {
        *e = (gib + j as u64 * TWO_MIB) | 0x83; // present, writable, 2 MiB page
    }
    page[((last - gib) / TWO_MIB) as usize] = pt | 0x3;
    let _ = mem.write(GuestPhysAddr::new(pd), as_bytes(&page));
    for (j, e) in page.iter_mut().enumerate() {
        let at = last + j as u64 * 0x1000;
        *e = match stack_guard(memory, vcpus, at) {
            Some(_) => 0,
            None => at | 0x3, // present, writable, 4 KiB page
        };
    }
    let _ = mem.write(GuestPhysAddr::new(pt), as_bytes(&page));
}

/// vCPU `vcpu`'s stack reserve, [start, end): `abi::VCPU_STACK_RESERVE` bytes ending `vcpu`
/// reserves below the top of RAM, its guard page the lowest 4 KiB.
pub fn stack_reserve(memory: u64, vcpu: u32) -> (u64, u64) {
    let end = memory.saturating_sub(u64::from(vcpu) * abi::VCPU_STACK_RESERVE);
    (end.saturating_sub(abi::VCPU_STACK_RESERVE), end)
}

/// The vCPU whose stack reserve (`abi::VCPU_STACK_RESERVE` bytes, vCPU v's ending `v`
/// reserves below the top of RAM, its guard page included) holds `addr`, if one does: where a
/// stopped vCPU's stack pointer lies, for its report.
pub fn stack_owner(memory: u64, vcpus: u32, addr: u64) -> Option<u32> {
    let v = memory.checked_sub(addr)?.checked_sub(1)? / abi::VCPU_STACK_RESERVE;
    (v < u64::from(vcpus.max(1))).then_some(v as u32)
}

/// The vCPU whose stack guard page holds guest-physical (and, identity-mapped, virtual)
/// address `addr`, if one does: the lowest 4 KiB of each vCPU's stack reserve
/// (`abi::VCPU_STACK_RESERVE`, vCPU v's reserve ending `v` reserves below the top of RAM)
/// is not in the guest's page tables, so a stack that outgrows its reserve takes a page
/// fault there instead of writing the next vCPU's stack (or, for the last vCPU, the heap).
pub fn stack_guard(memory: u64, vcpus: u32, addr: u64) -> Option<u32> {
    let v = stack_owner(memory, vcpus, addr)?;
    (addr - stack_reserve(memory, v).0 < 0x1000).then_some(v)
}

fn as_bytes(words: &[u64; 512]) -> &[u8] {
    // SAFETY: a u64 array is 4096 initialised bytes.
    unsafe { core::slice::from_raw_parts(words.as_ptr().cast::<u8>(), 4096) }
}
