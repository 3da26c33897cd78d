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
    write_page_tables(mem);
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
/// slots 1-7 the morsel window. Nine pages at `PAGE_TABLES_GPA`, inside guest RAM.
fn write_page_tables<F: Format<Input = GuestPhysAddr>, M: DataMem>(mem: &mut GuestMemory<F, M>) {
    let pml4 = abi::PAGE_TABLES_GPA;
    let slots = 1 + (abi::MORSEL_WINDOW_SIZE / (512 * GIB));
    let mut page = [0u64; 512];
    for slot in 0..slots {
        page[slot as usize] = (pml4 + 0x1000 * (slot + 1)) | 0x3; // present, writable
    }
    let _ = mem.write(GuestPhysAddr::new(pml4), as_bytes(&page));
    for slot in 0..slots {
        for (j, e) in page.iter_mut().enumerate() {
            *e = ((slot * 512 + j as u64) * GIB) | 0x83; // present, writable, 1 GiB page
        }
        let _ = mem.write(GuestPhysAddr::new(pml4 + 0x1000 * (slot + 1)), as_bytes(&page));
    }
}

fn as_bytes(words: &[u64; 512]) -> &[u8] {
    // SAFETY: a u64 array is 4096 initialised bytes.
    unsafe { core::slice::from_raw_parts(words.as_ptr().cast::<u8>(), 4096) }
}
